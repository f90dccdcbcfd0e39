//! Nothing the user has is clobbered: a finished run's output is refused to a second run unless
//! it is resumed or forced, a running run's output is locked, a file a flag names is never
//! truncated unless it is ours, checkpoints are verified whole (the state file too), `latest`
//! stays inside the output, a diverged adapter is never written or used, and a finished run
//! can be extended.

mod common;

use common::metrics;
use std::path::Path;
use std::process::Output;

type Run = common::TinyRun;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn train(r: &Run, out: &Path, steps: usize, extra: &[&str]) -> Output {
    r.train_command(out)
        .args(["--max-steps", &steps.to_string()])
        .args([
            "--batch-size",
            "2",
            "--lora-rank",
            "4",
            "--learning-rate",
            "1e-3",
        ])
        .args([
            "--warmup-steps",
            "10",
            "--save-every",
            "2",
            "--steps-per-eval",
            "0",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn a_second_run_into_a_used_output_is_refused_unless_resumed_or_forced() {
    let r = common::tiny_run(8);
    let out = r.root.join("out");
    let o = train(&r, &out, 2, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = adapter(&out);
    // Again, as it was: refused, and the earlier run is untouched.
    let o = train(&r, &out, 2, &["--seed", "9"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("not empty") && e.contains("--resume") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(adapter(&out), first);
    assert!(!out.join(".your_ai.lock").exists());
    // Refused before the model is looked at (at 8B its load takes minutes): here a model that
    // does not exist is never reached.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"))
        .args(["train", "--model", "no-such-model", "--data"])
        .arg(&r.data)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    // --force replaces it; a file of the user's in the directory stays.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = train(&r, &out, 2, &["--seed", "9", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(adapter(&out), first);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(metrics(&out.join("metrics.jsonl"), "start").len(), 1);

    // --resume where no checkpoint is left (deleted to save space) does not start the run
    // again over the finished one: refused, naming --force, the adapter and metrics untouched.
    std::fs::remove_dir_all(out.join("checkpoints")).unwrap();
    let (done, log) = (
        adapter(&out),
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
    );
    let o = train(&r, &out, 2, &["--seed", "9", "--resume"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("no checkpoint to continue from") && e.contains("adapter_model.safetensors"),
        "{e}"
    );
    assert_eq!(adapter(&out), done);
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), log);
}

/// `--force` removes an earlier run's outputs only once every check has passed, and never a
/// user's own folders that happen to share their names.
#[test]
fn force_replaces_only_an_earlier_run_and_only_when_the_run_can_start() {
    let r = common::tiny_run(8);
    let out = r.root.join("out");
    let o = train(&r, &out, 2, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = adapter(&out);
    let notes = r.root.join("notes.txt");
    std::fs::write(&notes, "mine").unwrap();
    let under_notes = notes.join("m.jsonl");
    for (metrics, says) in [
        (&notes, "not a metrics file"),
        (&under_notes, "is a file, not a directory"),
    ] {
        let o = train(
            &r,
            &out,
            2,
            &["--force", "--metrics-file", metrics.to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert_eq!(adapter(&out), first);
        assert!(out.join("checkpoints/latest").exists());
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");
    }
    // Folders of the user's named like a run's: refused, kept.
    let mine = r.root.join("mine");
    std::fs::create_dir_all(mine.join("checkpoints")).unwrap();
    std::fs::create_dir_all(mine.join("best")).unwrap();
    std::fs::write(mine.join("checkpoints/model_epoch10.pt"), "x").unwrap();
    std::fs::write(mine.join("best/model.pt"), "y").unwrap();
    let o = train(&r, &mine, 2, &["--force"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("checkpoints") && e.contains("best"), "{e}");
    assert!(mine.join("checkpoints/model_epoch10.pt").exists());
    assert!(mine.join("best/model.pt").exists());
}

#[test]
fn a_locked_output_is_refused_while_its_run_lives() {
    let r = common::tiny_run(8);
    let out = r.root.join("busy");
    std::fs::create_dir_all(&out).unwrap();
    // The lock of a live process (the test's own parent stands in for another run).
    let lock = out.join(".your_ai.lock");
    std::fs::write(&lock, format!("{}\n", std::os::unix::process::parent_id())).unwrap();
    let o = train(&r, &out, 2, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("another your_ai run"), "{}", stderr(&o));
    assert!(!out.join("adapter_model.safetensors").exists());
    // A dead process's lock is taken over.
    std::fs::write(&lock, "999999999\n").unwrap();
    let o = train(&r, &out, 2, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("taking over the lock"));
    assert!(!lock.exists());
}

#[test]
fn a_metrics_file_that_is_not_ours_is_never_truncated() {
    let r = common::tiny_run(8);
    let data = r.data.join("train.jsonl");
    let before = std::fs::read(&data).unwrap();
    let o = train(
        &r,
        &r.root.join("m"),
        2,
        &["--metrics-file", data.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a metrics file"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&data).unwrap(), before);
    // Refused: no empty --output left behind (the lock had made it).
    assert!(!r.root.join("m").exists());
}

#[test]
fn checkpoints_are_verified_whole_and_latest_stays_inside() {
    let r = common::tiny_run(8);
    let out = r.root.join("ck");
    let o = train(&r, &out, 4, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = out.join("checkpoints/step-4");
    let state_path = ck.join("trainer_state.json");
    let state = std::fs::read_to_string(&state_path).unwrap();
    let resume = |extra: &[&str]| train(&r, &out, 6, &[&["--resume"][..], extra].concat());
    // Emptying the state's own list of checksums, then flipping an optimizer byte: refused.
    let mut v: serde_json::Value = serde_json::from_str(&state).unwrap();
    v["checksums"] = serde_json::json!({});
    std::fs::write(&state_path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let o = resume(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("trainer_state.json does not match"),
        "{}",
        stderr(&o)
    );
    // An edited step: refused too.
    std::fs::write(&state_path, state.replace("\"step\": 4", "\"step\": 1")).unwrap();
    let o = resume(&[]);
    assert!(
        stderr(&o).contains("trainer_state.json does not match"),
        "{}",
        stderr(&o)
    );
    // Without the sums file: refused.
    std::fs::write(&state_path, &state).unwrap();
    let sums = std::fs::read(ck.join("SHA256SUMS")).unwrap();
    std::fs::remove_file(ck.join("SHA256SUMS")).unwrap();
    let o = resume(&[]);
    assert!(stderr(&o).contains("SHA256SUMS"), "{}", stderr(&o));
    std::fs::write(ck.join("SHA256SUMS"), sums).unwrap();
    // `latest` pointing outside the output is not followed: the newest checkpoint is used.
    std::fs::write(
        out.join("checkpoints/latest"),
        "../../ck/checkpoints/step-2\n",
    )
    .unwrap();
    let o = resume(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("is not a checkpoint there") && e.contains("step-4"),
        "{e}"
    );
}

/// `--resume` cuts its run's metrics back to the checkpoint: never another run's, named by
/// `--metrics-file`. Its own, named explicitly, is continued.
#[test]
fn a_resumed_run_never_cuts_back_another_run_s_metrics() {
    let r = common::tiny_run(8);
    let (a, b) = (r.root.join("a"), r.root.join("b"));
    for out in [&a, &b] {
        let o = train(&r, out, 4, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let theirs = b.join("metrics.jsonl");
    let before = std::fs::read(&theirs).unwrap();
    let o = train(
        &r,
        &a,
        6,
        &["--resume", "--metrics-file", theirs.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("another run's metrics") && e.contains("--metrics-file"),
        "{e}"
    );
    assert_eq!(std::fs::read(&theirs).unwrap(), before);
    let own = a.join("metrics.jsonl");
    let o = train(
        &r,
        &a,
        6,
        &["--resume", "--metrics-file", own.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics(&own, "train").len(), 6);
}

#[test]
fn a_finished_run_is_extended_with_resume_and_more_steps() {
    let r = common::tiny_run(8);
    let out = r.root.join("ext");
    // --warmup-steps 10 is capped at the 4 steps; extending to 6 must not trip over it.
    let o = train(&r, &out, 4, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&r, &out, 6, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The speed is this process's two steps', not six steps' tokens over its time.
    assert!(
        stderr(&o).contains("over 2 step(s) (step time only)"),
        "{}",
        stderr(&o)
    );
    let steps: Vec<u64> = metrics(&out.join("metrics.jsonl"), "train")
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_non_finite_adapter_is_refused_by_every_command_that_reads_one() {
    let r = common::tiny_run(8);
    let out = r.root.join("nan");
    let o = train(&r, &out, 2, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One NaN in the first tensor of the adapter file.
    let path = out.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut bad = bytes.clone();
    bad[8 + header..8 + header + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bad).unwrap();
    let model = r.model.to_str().unwrap().to_string();
    let adapter = out.to_str().unwrap().to_string();
    let cases: Vec<Vec<String>> = vec![
        vec!["generate".into(), "--prompt".into(), "hi".into()],
        vec![
            "eval".into(),
            "--data".into(),
            r.data.to_str().unwrap().into(),
        ],
        vec![
            "fuse".into(),
            "--output".into(),
            r.root.join("fused").to_str().unwrap().into(),
        ],
        vec![
            "export-adapter".into(),
            "--output".into(),
            r.root.join("a.gguf").to_str().unwrap().into(),
        ],
    ];
    for mut args in cases {
        args.extend([
            "--model".into(),
            model.clone(),
            "--adapter".into(),
            adapter.clone(),
        ]);
        let o = common::cli().args(&args).output().unwrap();
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?}: {e}");
        assert!(
            e.contains("NaN or infinite") && e.contains("lora_"),
            "{args:?}: {e}"
        );
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    assert!(!r.root.join("fused").exists() && !r.root.join("a.gguf").exists());
    // serve takes adapters by name; it refuses to start.
    let o = common::cli()
        .args(["serve", "--port", "0", "--model", &model, "--adapter"])
        .arg(format!("nan={adapter}"))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "serve: {e}");
    assert!(
        e.contains("NaN or infinite") && e.contains("lora_"),
        "serve: {e}"
    );
}

/// A base model with a NaN or infinite weight is refused by every command that loads one, and
/// the message names the tensor: a damaged checkpoint neither trains nor answers. Both kinds of
/// file: a float in a safetensors file, and a quantized GGUF block's scale.
#[test]
fn non_finite_base_weights_are_refused_naming_the_tensor() {
    let r = common::tiny_run(4);
    let good = r.root.join("good");
    let o = train(&r, &good, 1, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let gguf = r.root.join("bad.gguf");
    let spec = common::TinySpec {
        vocab: 49152,
        tied: true,
        ..Default::default()
    };
    let weights = common::tiny_weights(&spec, 5);
    common::write_gguf(
        &gguf,
        &spec,
        &weights,
        candle_core::quantized::GgmlDType::Q8_0,
        "llama",
    );
    let (q_at, len) = {
        let g = your_ai::weights::GgufFile::open(&gguf).unwrap();
        let info = &g.content.tensor_infos["blk.1.attn_v.weight"];
        (
            g.content.tensor_data_offset + info.offset,
            std::fs::metadata(&gguf).unwrap().len(),
        )
    };
    let mut bytes = std::fs::read(&gguf).unwrap();
    assert!(q_at + 2 <= len);
    // The first block's f16 scale.
    bytes[q_at as usize..q_at as usize + 2].copy_from_slice(&[0x00, 0x7E]);
    std::fs::write(&gguf, bytes).unwrap();

    let st = r.model.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..8 + header + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&st, bytes).unwrap();

    let adapter = good.to_str().unwrap().to_string();
    for model in [&r.model, &gguf] {
        let m = model.to_str().unwrap().to_string();
        let fused = r.root.join("fused");
        let out = r.root.join("out");
        let cases: Vec<Vec<String>> = vec![
            vec![
                "train".into(),
                "--data".into(),
                r.data.to_str().unwrap().into(),
                "--output".into(),
                out.to_str().unwrap().into(),
                "--max-steps".into(),
                "1".into(),
            ],
            vec!["generate".into(), "--prompt".into(), "hi".into()],
            vec!["serve".into(), "--port".into(), "0".into()],
            vec![
                "eval".into(),
                "--data".into(),
                r.data.to_str().unwrap().into(),
            ],
            vec![
                "fuse".into(),
                "--adapter".into(),
                adapter.clone(),
                "--dequantize".into(),
                "--format".into(),
                "gguf".into(),
                "--output".into(),
                fused.to_str().unwrap().into(),
            ],
        ];
        // The GGUF's tokenizer (`t0`, `t1`, …, no merges) encodes no text: its training data
        // is refused first, before the weights are read.
        let trains = model == &r.model;
        for mut args in cases.into_iter().filter(|c| trains || c[0] != "train") {
            args.extend(["--model".into(), m.clone()]);
            let o = common::cli().args(&args).output().unwrap();
            let e = stderr(&o);
            assert!(!o.status.success(), "{args:?}: {e}");
            assert!(
                e.contains("NaN or infinite") && e.contains("tensor `") && e.contains(&m),
                "{args:?}: {e}"
            );
            assert!(!e.contains("panicked"), "{args:?}: {e}");
            // Nothing made: not even the output directory the run claimed before its load.
            assert!(!fused.exists() && !out.exists(), "{args:?}");
        }
        if !trains {
            continue;
        }
        // `--force` over a finished run, with a model that cannot load: the run never starts,
        // and the earlier one is all there.
        let before = std::fs::read(good.join("adapter_model.safetensors")).unwrap();
        let o = common::cli()
            .args(["train", "--model", &m, "--data", r.data.to_str().unwrap()])
            .args([
                "--output",
                good.to_str().unwrap(),
                "--max-steps",
                "1",
                "--force",
            ])
            .output()
            .unwrap();
        assert!(!o.status.success() && stderr(&o).contains("NaN or infinite"));
        assert_eq!(
            std::fs::read(good.join("adapter_model.safetensors")).unwrap(),
            before
        );
        assert!(good.join("metrics.jsonl").is_file() && good.join("checkpoints").is_dir());
    }
}

/// What a run writes is readable as any file it creates: the safetensors files (adapter,
/// optimizer state) get the same mode as the JSON beside them, not the 0600 the safetensors
/// library leaves.
#[cfg(unix)]
#[test]
fn written_safetensors_are_as_readable_as_the_json_beside_them() {
    use std::os::unix::fs::PermissionsExt;
    let r = common::tiny_run(4);
    let out = r.root.join("modes");
    let o = train(&r, &out, 2, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let json = mode(&out.join("adapter_config.json"));
    assert_eq!(mode(&out.join("adapter_model.safetensors")), json);
    let ckpt = out.join("checkpoints").join("step-2");
    assert_eq!(mode(&ckpt.join("optimizer.safetensors")), json);
    assert_eq!(mode(&ckpt.join("adapter_model.safetensors")), json);
}

/// Inputs that used to get a misleading message get one naming the flag or file and the fix.
#[test]
fn unclear_inputs_get_clear_messages() {
    let r = common::tiny_run(4);
    let fails = |extra: &[&str], needles: &[&str]| {
        let out = r.root.join("m");
        let o = train(&r, &out, 2, extra);
        let e = stderr(&o);
        assert!(!o.status.success(), "{extra:?}: {e}");
        for n in needles {
            assert!(e.contains(n), "{extra:?}: `{n}` not in {e}");
        }
        assert!(!out.exists(), "{extra:?} left an output");
    };
    // A YAML type error names the file and the key; a tool call's `content: null` that the
    // template cannot take names the line and the fix.
    let yaml = r.root.join("run.yaml");
    std::fs::write(&yaml, "lora_alpha: abc\n").unwrap();
    fails(
        &["--config", yaml.to_str().unwrap()],
        &["run.yaml", "lora-alpha", "invalid type"],
    );
    let tool = r.root.join("tool.jsonl");
    std::fs::write(
        &tool,
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","content":"ok"},{"role":"assistant","content":"done"}]}"#.to_string() + "\n",
    )
    .unwrap();
    fails(
        &["--data", tool.to_str().unwrap()],
        &["tool.jsonl:1", "content: null", "give it a string"],
    );
    // A FIFO, a device and a symlink loop are not "missing".
    let fifo = r.root.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    fails(&["--data", fifo.to_str().unwrap()], &["not a regular file"]);
    fails(&["--data", "/dev/zero"], &["not a regular file"]);
    let looped = r.root.join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let o = train(
        &r,
        &r.root.join("m"),
        2,
        &["--data", looped.to_str().unwrap()],
    );
    let e = stderr(&o);
    assert!(!o.status.success() && !e.contains("does not exist"), "{e}");
    // Values no run can use.
    fails(
        &["--keep-checkpoints", "0"],
        &["--keep-checkpoints 0", "at least 1"],
    );
    fails(
        &["--learning-rate", "inf"],
        &["--learning-rate inf", "finite"],
    );
    fails(&["--learning-rate=-1e308"], &["-1e308"]);
    fails(
        &["--learning-rate", "-1e-3"],
        &["--learning-rate -0.001", "positive"],
    );
    // An --output that is a file is named with the flag (it was a bare "File exists"), and the
    // file is left as it was.
    let file = r.root.join("a-file");
    std::fs::write(&file, "keep").unwrap();
    let o = train(&r, &file, 2, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--output") && e.contains("is a file"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A byte-order mark before the first line is not an error.
    let bom = r.root.join("bom");
    std::fs::create_dir_all(&bom).unwrap();
    let rows = std::fs::read_to_string(r.data.join("train.jsonl")).unwrap();
    std::fs::write(bom.join("train.jsonl"), format!("\u{feff}{rows}")).unwrap();
    let o = train(
        &r,
        &r.root.join("bom-out"),
        1,
        &["--data", bom.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A stop signal is acknowledged at once and honoured within the current evaluation batch: a
/// Ctrl-C during a long validation pass ends the run in seconds, with a checkpoint that resumes.
#[test]
fn a_signal_during_evaluation_ends_the_run_in_seconds() {
    let r = common::tiny_run(8);
    let row = std::fs::read_to_string(r.data.join("valid.jsonl")).unwrap();
    let row = row.lines().next().unwrap().to_string();
    let many = vec![row; 30_000].join("\n") + "\n";
    std::fs::write(r.data.join("valid.jsonl"), many).unwrap();
    let out = r.root.join("sig");
    let mut child = r
        .train_command(&out)
        .args(["--max-steps", "4", "--batch-size", "2", "--lora-rank", "4"])
        .args(["--steps-per-eval", "1", "--val-batches", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The start record is written just before the step-0 evaluation begins.
    let started = std::time::Instant::now();
    let m = out.join("metrics.jsonl");
    while !m.exists() || metrics(&m, "start").is_empty() {
        assert!(started.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let took = sent.elapsed();
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.code(), Some(130), "{:?} {e}", status.signal());
    assert!(e.contains("stopping:"), "{e}");
    // Stopped inside the evaluation, which would have taken far longer.
    assert!(!e.contains("step 0: val loss"), "{e}");
    assert!(took.as_secs_f64() < 5.0, "took {took:?} after the signal");
    assert!(out.join("checkpoints/step-0/SHA256SUMS").is_file());
    // Resumed (over a shorter validation), the cut validation is done first: every step's is
    // in the record, as in a run never stopped (and `best/` is judged on all of them).
    let o = r
        .train_command(&out)
        .args(["--max-steps", "4", "--batch-size", "2", "--lora-rank", "4"])
        .args(["--steps-per-eval", "1", "--val-batches", "1", "--resume"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<u64> = metrics(&m, "eval")
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 1, 2, 3, 4]);
}
