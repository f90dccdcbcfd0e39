//! Nothing lost: a run killed (SIGKILL) or interrupted (SIGINT) at random points and resumed
//! ends with the same adapter and the same per-step losses, bit for bit, as a run that was never
//! stopped; every checkpoint directory is complete or absent; damaged checkpoints are caught.

mod common;

use common::metrics;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Run = common::TinyRun;

fn setup() -> Run {
    common::tiny_run(10)
}

const STEPS: usize = 24;

fn command(r: &Run, out: &Path, extra: &[&str]) -> Command {
    let mut c = r.train_command(out);
    c.args([
        "--max-steps",
        &STEPS.to_string(),
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-3",
    ])
    .args([
        "--warmup-steps",
        "3",
        "--save-every",
        "2",
        "--steps-per-eval",
        "5",
        "--seed",
        "3",
    ])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn losses(out: &Path) -> Vec<u64> {
    // Bit patterns: exact equality, not approximate.
    metrics(&out.join("metrics.jsonl"), "train")
        .iter()
        .map(|l| l["loss"].as_f64().unwrap().to_bits())
        .collect()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

/// Starts the run, stops it with `signal` once `checkpoints/latest` reaches `after` steps (plus
/// a delay), and returns the exit status (None if it finished first).
fn stop_at(
    r: &Run,
    out: &Path,
    extra: &[&str],
    after: usize,
    delay_ms: u64,
    signal: i32,
) -> Option<i32> {
    stop_with(&mut command(r, out, extra), out, after, delay_ms, signal)
}

fn resume_to_end(r: &Run, out: &Path, extra: &[&str]) {
    let o = command(r, out, &[extra, &["--resume"]].concat())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn check_checkpoints_complete(out: &Path) {
    // Hidden temporaries of a cut-short save may remain; they are never taken for checkpoints
    // and the next save clears them.
    for entry in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("step-") {
            // Complete and valid: loading verifies every checksum.
            your_ai::train::checkpoint::load(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn killed_and_interrupted_runs_resume_bit_for_bit() {
    let r = setup();
    for extra in [
        &[][..],
        &[
            "--grad-accumulation-steps",
            "2",
            "--pack",
            "--max-seq-length",
            "128",
        ][..],
    ] {
        let reference = r.root.join(format!("ref{}", extra.len()));
        assert!(command(&r, &reference, extra).status().unwrap().success());
        let (want_losses, want_adapter) = (losses(&reference), adapter_bytes(&reference));
        assert_eq!(want_losses.len(), STEPS);

        // SIGKILL at several points, resuming after each.
        let out = r.root.join(format!("killed{}", extra.len()));
        let mut kills = 0;
        for (after, delay) in [(2, 0), (6, 7), (10, 3), (14, 11)] {
            let code = if out.exists() {
                let mut c = command(&r, &out, &[extra, &["--resume"]].concat());
                stop_with(&mut c, &out, after, delay, libc::SIGKILL)
            } else {
                stop_at(&r, &out, extra, after, delay, libc::SIGKILL)
            };
            if code.is_some() {
                kills += 1;
                check_checkpoints_complete(&out);
            }
        }
        assert!(kills >= 2, "too few kills landed ({kills})");
        resume_to_end(&r, &out, extra);
        assert_eq!(
            losses(&out),
            want_losses,
            "losses after SIGKILL/resume ({extra:?})"
        );
        assert_eq!(
            adapter_bytes(&out),
            want_adapter,
            "adapter after SIGKILL/resume ({extra:?})"
        );

        // SIGINT: finishes the step, saves, exits 130, and resumes exactly.
        let out = r.root.join(format!("sigint{}", extra.len()));
        let code = stop_at(&r, &out, extra, 4, 2, libc::SIGINT);
        assert_eq!(code, Some(130));
        check_checkpoints_complete(&out);
        resume_to_end(&r, &out, extra);
        assert_eq!(
            losses(&out),
            want_losses,
            "losses after SIGINT/resume ({extra:?})"
        );
        assert_eq!(
            adapter_bytes(&out),
            want_adapter,
            "adapter after SIGINT/resume ({extra:?})"
        );
    }
}

/// Runs `c`, stops it with `signal` once `checkpoints/latest` under `out` reaches `after`
/// steps (plus a delay); returns its exit status, or None if it finished first.
fn stop_with(c: &mut Command, out: &Path, after: usize, delay_ms: u64, signal: i32) -> Option<i32> {
    let mut child = c.spawn().unwrap();
    let latest = out.join("checkpoints/latest");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        let step = std::fs::read_to_string(&latest)
            .ok()
            .and_then(|s| {
                s.trim()
                    .strip_prefix("step-")
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .unwrap_or(0);
        if step >= after {
            std::thread::sleep(Duration::from_millis(delay_ms));
            unsafe { libc::kill(child.id() as i32, signal) };
            let status = child.wait().unwrap();
            use std::os::unix::process::ExitStatusExt;
            return Some(
                status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "run did not reach step {after}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn resume_refuses_changed_settings_and_damaged_checkpoints() {
    let r = setup();
    let out = r.root.join("run");
    let short = ["--max-steps", "4"];
    assert!(command(&r, &out, &short).status().unwrap().success());
    // A harmless change (more steps) is allowed and reported.
    let o = command(&r, &out, &["--max-steps", "6", "--resume"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming from") && stderr.contains("steps: 4 → 6"),
        "{stderr}"
    );
    // A shape-changing one is refused with the list of differences.
    let o = command(
        &r,
        &out,
        &[
            "--max-steps",
            "8",
            "--lora-rank",
            "8",
            "--batch-size",
            "1",
            "--quantize",
            "8",
            "--resume",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("lora_rank: 4 → 8")
            && stderr.contains("batch_size: 2 → 1")
            && stderr.contains("quantize: null → 8"),
        "{stderr}"
    );
    // Changed data is refused.
    std::fs::write(
        r.data.join("train.jsonl"),
        std::fs::read_to_string(r.data.join("train.jsonl"))
            .unwrap()
            .replace("blue", "red"),
    )
    .unwrap();
    let o = command(&r, &out, &["--max-steps", "8", "--resume"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("training data"));
    // A damaged checkpoint is detected and the previous one offered.
    let ckpts = out.join("checkpoints");
    let latest = std::fs::read_to_string(ckpts.join("latest"))
        .unwrap()
        .trim()
        .to_string();
    let f = ckpts.join(&latest).join("optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&f, bytes).unwrap();
    let e = your_ai::train::checkpoint::load(&ckpts.join(&latest))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("optimizer.safetensors does not match its checksum")
            && e.contains("the previous checkpoint is"),
        "{e}"
    );
}

/// Unmounts the small filesystem when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_training_cleanly_and_keeps_the_last_checkpoint() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let r = setup();
    let mnt = r.root.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs failed");
    let _guard = Mounted(mnt.clone());
    let out = mnt.join("run");
    let child = command(&r, &out, &["--save-every", "1", "--max-steps", "200"])
        .spawn()
        .unwrap();
    // Once a checkpoint exists, fill the disk.
    let latest = out.join("checkpoints/latest");
    let start = Instant::now();
    while !latest.exists() {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "training went on with a full disk");
    assert!(
        stderr.contains("No space left") || stderr.contains("space"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Every checkpoint that exists is complete; the run resumes once there is room again.
    check_checkpoints_complete(&out);
    std::fs::remove_file(&filler).unwrap();
    let o = command(
        &r,
        &out,
        &["--save-every", "50", "--max-steps", "30", "--resume"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn sigterm_saves_and_exits_143_and_the_run_resumes() {
    let r = setup();
    let out = r.root.join("term");
    assert_eq!(stop_at(&r, &out, &[], 3, 1, libc::SIGTERM), Some(143));
    check_checkpoints_complete(&out);
    resume_to_end(&r, &out, &[]);
    assert_eq!(metrics(&out.join("metrics.jsonl"), "train").len(), STEPS);
}

/// Everything under `<out>/checkpoints` is a complete, verified `step-N`, the `latest` pointer
/// naming one of them, or a hidden leftover of a cut-short write (never listed as a
/// checkpoint). Returns the hidden leftovers' names.
fn check_checkpoint_root(out: &Path, context: &str) -> Vec<String> {
    let root = out.join("checkpoints");
    let Ok(rd) = std::fs::read_dir(&root) else {
        return vec![];
    };
    let mut hidden = vec![];
    for entry in rd {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("step-") {
            let loaded = your_ai::train::checkpoint::load(&p)
                .unwrap_or_else(|e| panic!("{context}: {name}: {e}"));
            for f in [
                "adapter_model.safetensors",
                "adapter_config.json",
                "optimizer.safetensors",
                "train_config.json",
            ] {
                assert!(
                    loaded.state.checksums.contains_key(f),
                    "{context}: {name} lacks {f}"
                );
            }
        } else if name == "latest" {
            let target = std::fs::read_to_string(&p).unwrap();
            let target = target.trim();
            assert!(
                target.starts_with("step-") && root.join(target).is_dir(),
                "{context}: latest names {target:?}, which is not a checkpoint"
            );
        } else if name.starts_with('.') {
            hidden.push(name);
        } else {
            panic!("{context}: unexpected entry {name} in checkpoints/");
        }
    }
    let listed = your_ai::train::checkpoint::list(&root);
    assert!(
        hidden.iter().all(|h| !listed
            .iter()
            .any(|s| h.trim_start_matches('.') == format!("step-{s}"))),
        "{context}: a hidden leftover was listed as a checkpoint"
    );
    // `best/` is replaced by rename too: whatever is there is whole.
    let best = out.join("best/adapter_model.safetensors");
    if best.exists() {
        candle_core::safetensors::load(&best, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{context}: best/ adapter: {e}"));
    }
    hidden
}

fn read_latest(out: &Path) -> Option<String> {
    std::fs::read_to_string(out.join("checkpoints/latest"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn save_in_progress(out: &Path) -> bool {
    std::fs::read_dir(out.join("checkpoints")).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(".step-") && n.contains(".partial-")
        })
    })
}

/// SIGKILL lands at random moments of runs that save a checkpoint after every step, half of
/// the kills timed from the moment a save's temporary directory appears. After every kill the
/// checkpoints are complete or absent, `latest` names a valid one, the next `--resume` works,
/// and each chain of killed-and-resumed runs ends bit-identical to an uninterrupted run.
/// `KILL_SEED=n` varies the moments.
#[test]
fn sigkill_during_checkpoint_writes_never_leaves_a_partial_checkpoint() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const TRIALS: usize = 100;
    let r = setup();
    let extra = ["--save-every", "1"];
    let reference = r.root.join("ref");
    let t0 = Instant::now();
    assert!(command(&r, &reference, &extra).status().unwrap().success());
    let ref_secs = t0.elapsed().as_secs_f64();
    let (want_losses, want_adapter) = (losses(&reference), adapter_bytes(&reference));
    // One step plus its save, from the uninterrupted run (an upper bound: it includes start-up).
    let cycle_ms = ((ref_secs * 1000.0 / STEPS as f64) as u64).clamp(5, 500);

    let (mut kills, mut mid_save, mut chains, mut finished_early) = (0, 0, 0, 0);
    let mut chain = 0;
    let mut out = r.root.join("chain0");
    let mut log = vec![];
    while kills < TRIALS {
        let resuming = read_latest(&out).is_some();
        let mut c = command(&r, &out, &extra);
        // A run killed before its first checkpoint is started again with --resume too: its
        // output is not empty, and --resume with no checkpoint starts from the beginning.
        if out.exists() {
            c.arg("--resume");
        }
        let before = read_latest(&out);
        let mut child = c.spawn().unwrap();
        let targeted = rng.random_bool(0.5);
        let delay_ms = if targeted {
            rng.random_range(0..=cycle_ms / 2)
        } else {
            rng.random_range(0..=cycle_ms)
        };
        let what = format!(
            "seed {seed}, chain {chain}, trial {kills}: {} + {delay_ms} ms",
            if targeted {
                "after a save begins"
            } else {
                "after a new checkpoint"
            }
        );
        // Wait for progress (a new checkpoint), then, for targeted trials, for the next save.
        let start = Instant::now();
        let mut exited = None;
        let mut progressed = false;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                exited = Some(s);
                break;
            }
            if !progressed {
                progressed = read_latest(&out) != before;
            } else if !targeted || save_in_progress(&out) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        if exited.is_none() {
            std::thread::sleep(Duration::from_millis(delay_ms));
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let status = child.wait().unwrap();
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            use std::os::unix::process::ExitStatusExt;
            if status.signal() == Some(libc::SIGKILL) {
                kills += 1;
                let hidden = check_checkpoint_root(&out, &what);
                if hidden.iter().any(|h| h.contains(".partial-")) {
                    mid_save += 1;
                }
                // The previous process's leftovers went with this process's first save.
                let prev_pid = log.last().map(|(_, pid): &(String, u32)| *pid);
                if let Some(pid) = prev_pid.filter(|_| resuming) {
                    assert!(
                        !hidden.iter().any(|h| h.ends_with(&format!("-{pid}"))),
                        "{what}: leftovers of process {pid} were not cleared: {hidden:?}"
                    );
                }
                log.push((what.clone(), child.id()));
                continue;
            }
            exited = Some(status);
            assert!(status.success(), "{what}: {stderr}");
        }
        let status = exited.unwrap();
        if !status.success() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("{what}: the run failed: {stderr}");
        }
        // The chain reached the end: it must equal the uninterrupted run, bit for bit.
        finished_early += usize::from(log.is_empty());
        assert_eq!(losses(&out), want_losses, "{what}: losses of chain {chain}");
        assert_eq!(
            adapter_bytes(&out),
            want_adapter,
            "{what}: adapter of chain {chain}"
        );
        check_checkpoint_root(&out, &what);
        chains += 1;
        chain += 1;
        log.clear();
        out = r.root.join(format!("chain{chain}"));
    }
    // The last chain, killed at its last trial, is resumed to the end and compared too.
    resume_to_end(&r, &out, &extra);
    assert_eq!(
        losses(&out),
        want_losses,
        "seed {seed}: losses of the last chain"
    );
    assert_eq!(
        adapter_bytes(&out),
        want_adapter,
        "seed {seed}: adapter of the last chain"
    );
    chains += 1;
    eprintln!(
        "seed {seed}: {kills} SIGKILLs ({mid_save} left a save's temporary directory), \
         {chains} chains resumed bit-identical ({finished_early} finished unkilled), \
         step+save ≈ {cycle_ms} ms, {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        mid_save >= TRIALS / 10,
        "only {mid_save} of {kills} kills landed inside a save"
    );
}

/// A second Ctrl-C exits at once (130) without waiting for the step or its checkpoint; the
/// checkpoints already written stay valid, none is half-written, and the run resumes.
#[test]
fn a_second_sigint_exits_at_once_and_leaves_the_last_checkpoint_intact() {
    let r = setup();
    // Long examples make a step last long enough (hundreds of ms) for two signals to land in it.
    let data = r.root.join("long");
    std::fs::create_dir_all(&data).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let rows: String = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("{i}: {text}")},
                {"role": "assistant", "content": format!("{text} {i}")}]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(data.join("train.jsonl"), rows).unwrap();
    let run = |out: &Path, steps: usize| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_your_ai"));
        c.env_remove("RUST_LOG")
            .arg("train")
            .arg("--model")
            .arg(&r.model)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(out)
            .args(["--batch-size", "2", "--max-seq-length", "256"])
            .args(["--lora-rank", "4", "--save-every", "1", "--seed", "1"])
            .args(["--warmup-steps", "0"])
            .args(["--max-steps", &steps.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    for (trial, gap_ms) in [20u64, 60, 150].into_iter().enumerate() {
        let out = r.root.join(format!("twice{trial}"));
        let mut child = run(&out, 100).spawn().unwrap();
        let start = Instant::now();
        while read_latest(&out).as_deref() != Some("step-2") {
            assert!(child.try_wait().unwrap().is_none(), "the run ended early");
            assert!(start.elapsed() < Duration::from_secs(120), "no step 2");
            std::thread::sleep(Duration::from_millis(2));
        }
        let step_s = metrics(&out.join("metrics.jsonl"), "train")[1]["step_time_s"]
            .as_f64()
            .unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::sleep(Duration::from_millis(gap_ms));
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let second = Instant::now();
        let status = child.wait().unwrap();
        let waited = second.elapsed().as_secs_f64();
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(130), "trial {trial}: {stderr}");
        // The first signal stops the run after the current block (with a checkpoint); the
        // second, if it comes before that, exits at once. Either way: 130, soon, and nothing
        // half-written.
        assert!(
            waited < step_s.max(0.5),
            "trial {trial}: exit took {waited:.2} s after the second signal (a step takes {step_s:.2} s)"
        );
        let what = format!("double SIGINT, trial {trial}");
        check_checkpoint_root(&out, &what);
        let latest = read_latest(&out).unwrap();
        let step: usize = latest.trim_start_matches("step-").parse().unwrap();
        assert!(step >= 2, "{what}: latest went back to {latest}");
        // Resumable: one more step from the last good checkpoint.
        let o = run(&out, step + 1).arg("--resume").output().unwrap();
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            read_latest(&out).unwrap(),
            format!("step-{}", step + 1),
            "{what}"
        );
        eprintln!("{what}: exited {waited:.3} s after the second signal (step {step_s:.2} s), resumed from {latest}");
    }
}

/// Killed after its last checkpoint but before the final adapter was written: `--resume`
/// finishes the run (it used to refuse: "the checkpoint is at step N, the run has N steps"),
/// with the same adapter and one final evaluation and end record in the metrics.
#[test]
fn a_run_stopped_after_its_last_checkpoint_resumes_to_write_the_adapter() {
    let r = setup();
    let out = r.root.join("last");
    assert!(command(&r, &out, &[]).status().unwrap().success());
    let (want_losses, want_adapter) = (losses(&out), adapter_bytes(&out));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    resume_to_end(&r, &out, &[]);
    assert_eq!(adapter_bytes(&out), want_adapter);
    assert_eq!(losses(&out), want_losses);
    let m = out.join("metrics.jsonl");
    let at_end = |kind: &str| {
        metrics(&m, kind)
            .iter()
            .filter(|l| l["step"] == STEPS)
            .count()
    };
    assert_eq!((at_end("eval"), at_end("end")), (1, 1));
}
