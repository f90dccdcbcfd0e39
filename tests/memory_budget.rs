//! Memory as a contract: the pre-flight refuses what will not fit and its advice works; a run
//! that crosses its budget stops with a checkpoint that resumes; memory is flat over 100+
//! steps; `--reload-interval` changes nothing but memory.

mod common;

use common::metrics;
use std::path::Path;
use std::process::Output;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn losses(out: &Path) -> Vec<u64> {
    metrics(&out.join("metrics.jsonl"), "train")
        .iter()
        .map(|l| l["loss"].as_f64().unwrap().to_bits())
        .collect()
}

fn tiny_args(steps: usize) -> Vec<String> {
    [
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-3",
        "--seed",
        "5",
        "--steps-per-eval",
        "4",
        "--save-every",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn over_budget_refused_with_advice_that_works() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_chat_data(&dir.path().join("data"), 12);
    let run = |extra: &[&str], out: &str| {
        common::cli()
            .arg("train")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(dir.path().join(out))
            .args([
                "--max-steps",
                "1",
                "--max-seq-length",
                "256",
                "--max-memory",
                "0.8",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--batch-size", "8", "--lora-rank", "16"], "refused");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("Set memory limit to 0.80 GB"), "{e}");
    assert!(e.contains("Memory estimate"), "{e}");
    assert!(e.contains("over the 0.80 GB budget"), "{e}");
    assert!(
        !dir.path().join("refused").exists(),
        "a refused run writes nothing"
    );
    // Every suggestion, applied on its own, starts and finishes.
    let advice = e
        .split("any one of these fits: ")
        .nth(1)
        .expect("advice given")
        .split(" (or pass")
        .next()
        .unwrap()
        .to_string();
    let first: Vec<&str> = advice.split(", ").next().unwrap().split(' ').collect();
    assert_eq!(first.len(), 2, "{advice}");
    let mut args = vec!["--batch-size", "8", "--lora-rank", "16"];
    let pos = args.iter().position(|a| *a == first[0]);
    match pos {
        Some(p) => args[p + 1] = first[1],
        None => args.extend([first[0], first[1]]),
    }
    let o = run(&args, "advised");
    assert!(o.status.success(), "{advice}: {}", stderr(&o));
    // --auto-fit picks a batch size instead of refusing.
    let o = run(
        &["--batch-size", "8", "--lora-rank", "16", "--auto-fit"],
        "fit",
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("--auto-fit: batch size 8"), "{e}");
    // With a tenth of the budget spare (the estimate is not exact), or at batch 1 the most
    // spare there is.
    let share: f64 = e
        .lines()
        .find(|l| l.trim_start().starts_with("estimated peak"))
        .and_then(|l| l.split('(').nth(1)?.split('%').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no estimated peak line: {e}"));
    assert!(
        share <= 90.0 || e.contains("training with batch size 1,"),
        "{e}"
    );
    // A budget above the machine is refused.
    let o = run(&["--max-memory", "100000"], "huge");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("this device has only"),
        "{}",
        stderr(&o)
    );
}

/// `estimate` and `train`'s pre-flight print the same table for the same model and flags:
/// weights as the file holds them, activations kept as `auto` resolves against the budget, and
/// the streamed load's peak.
/// `estimate` prints the table `train` plans with, for QLoRA, for bf16 weights on the CPU
/// (computed in f32 there) and for packed rows.
#[test]
fn estimate_and_train_agree_on_the_same_model_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::smollm2();
    let shape = [
        "--batch-size",
        "2",
        "--max-seq-length",
        "128",
        "--lora-rank",
        "8",
    ];
    for (i, given) in [
        &["--quantize", "4", "--max-memory", "0.3"][..],
        &["--dtype", "bf16", "--device", "cpu", "--max-memory", "0.6"][..],
        // Packed rows each have their own attention mask.
        &["--pack", "--max-memory", "0.9"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let e = common::cli()
            .args(["estimate", "--model"])
            .arg(&model)
            .args(shape)
            .args(given)
            .output()
            .unwrap();
        assert!(e.status.success(), "{}", stderr(&e));
        let estimated = common::estimate_table(&String::from_utf8_lossy(&e.stdout));
        let t = common::cli()
            .args(["train", "--model"])
            .arg(&model)
            .args([
                "--data",
                "examples/invented-country/train.jsonl",
                "--output",
            ])
            .arg(tmp.path().join(format!("out{i}")))
            .args(["--max-steps", "1"])
            .args(shape)
            .args(given)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(t.status.success(), "{given:?}: {}", stderr(&t));
        let trained = common::estimate_table(&stderr(&t));
        assert!(estimated.len() >= 7, "{estimated:?}");
        assert!(
            estimated.iter().any(|l| l.contains(" kept")),
            "{given:?}: auto keeps activations within the budget: {estimated:?}"
        );
        assert_eq!(estimated, trained, "{given:?}");
    }
}

#[test]
fn crossing_the_budget_saves_and_resumes_exactly() {
    let r = common::tiny_run(10);
    let whole = r.root.join("whole");
    let o = r.train_command(&whole).args(tiny_args(8)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // From step 5 on the budget is a single byte: step 5 is abandoned, step 4 is saved.
    let cut = r.root.join("cut");
    let o = r
        .train_command(&cut)
        .args(tiny_args(8))
        .args(["--test-memory-limit", "1@5"])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{e}");
    assert!(e.contains("memory budget exceeded"), "{e}");
    assert!(e.contains("during step 5"), "{e}");
    assert!(e.contains("Checkpoint of step 4"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(cut
        .join("checkpoints/step-4/adapter_model.safetensors")
        .exists());

    let o = r
        .train_command(&cut)
        .args(tiny_args(8))
        .arg("--resume")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&whole), losses(&cut));
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn reload_interval_changes_nothing_but_memory() {
    let r = common::tiny_run(10);
    let plain = r.root.join("plain");
    let o = r
        .train_command(&plain)
        .args(tiny_args(20))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let reloaded = r.root.join("reloaded");
    let o = r
        .train_command(&reloaded)
        .args(tiny_args(20))
        .args(["--reload-interval", "7"])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert_eq!(
        e.matches("reloaded model, adapter and optimizer").count(),
        2
    );
    assert_eq!(losses(&plain), losses(&reloaded));
    assert_eq!(
        std::fs::read(plain.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(reloaded.join("adapter_model.safetensors")).unwrap()
    );
    let reloads = metrics(&reloaded.join("metrics.jsonl"), "reload");
    assert_eq!(
        reloads
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [7, 14]
    );
    // Not higher after a reload than before it, nor after the second than after the first,
    // up to the allocator's granularity (1 MiB; the tiny model's whole state is ~40 MB).
    let slack = 1 << 20;
    let after: Vec<u64> = reloads
        .iter()
        .map(|r| r["rss_after_bytes"].as_u64().unwrap())
        .collect();
    for (r, &a) in reloads.iter().zip(&after) {
        let before = r["rss_before_bytes"].as_u64().unwrap();
        assert!(
            a <= before + slack,
            "resident memory grew across a reload: {r}"
        );
    }
    assert!(after[1] <= after[0] + slack, "reloads grew: {after:?}");
    // Zero is not an interval.
    let o = r
        .train_command(&r.root.join("zero"))
        .args(tiny_args(2))
        .args(["--reload-interval", "0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--reload-interval 0"));
}

/// SmolLM2 for 110 short steps of real, variable-length data: resident memory at the end is
/// within 2% (or 32 MB) of step 10, and every step's memory is in the metrics file.
#[test]
fn memory_is_flat_over_a_hundred_steps() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = common::cli()
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/invented-country"
        ))
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "110",
            "--batch-size",
            "1",
            "--max-seq-length",
            "96",
        ])
        .args([
            "--lora-rank",
            "8",
            "--steps-per-eval",
            "0",
            "--save-every",
            "0",
        ])
        .args(["--num-layers", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let steps = metrics(&out.join("metrics.jsonl"), "train");
    assert_eq!(steps.len(), 110);
    let rss = |s: usize| steps[s - 1]["rss_bytes"].as_u64().unwrap() as f64;
    for s in &steps {
        assert!(s["rss_bytes"].as_u64().is_some() && s["train_peak_rss_bytes"].as_u64().is_some());
    }
    let (at10, end) = (rss(10), rss(110));
    let allowed = (0.02 * at10).max(32e6);
    assert!(
        (end - at10).abs() <= allowed,
        "resident memory moved from {at10} at step 10 to {end} at step 110"
    );
}

/// benchmark → saved best configuration → train --auto-optimize; recommend and setup; a child
/// stopped by its budget is reported as such, and configurations over the budget are skipped.
#[test]
fn benchmark_recommend_setup_and_auto_optimize() {
    let r = common::tiny_run(6);
    let cfg_dir = r.root.join("config");
    let report = r.root.join("bench.json");
    let bench = |extra: &[&str]| {
        common::cli()
            .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
            .arg("benchmark")
            .arg("--model")
            .arg(&r.model)
            .args(["--batch-sizes", "1,2", "--lengths", "32", "--ranks", "4"])
            .args(["--steps", "2", "--output"])
            .arg(&report)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = bench(&["--quantize", "none,8"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("Fastest configuration that fits"), "{out}");
    assert!(out.contains("8-bit"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let configs = json["configurations"].as_array().unwrap();
    assert_eq!(configs.len(), 4);
    let quantized = configs.iter().filter(|c| c["quantize"] == 8).count();
    assert_eq!(quantized, 2, "{configs:?}");
    for c in configs {
        assert_eq!(c["status"], "ok", "{c}");
        assert!(c["peak_bytes"].as_u64().unwrap() > 0 && c["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(c["estimate_bytes"].as_u64().unwrap() > 0);
    }
    let command = json["recommended"]["command"].as_str().unwrap();
    assert!(command.starts_with("your_ai train --model "), "{command}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg_dir.join("setup.json")).unwrap())
            .unwrap();
    assert_eq!(saved["best"].as_object().unwrap().len(), 1);

    // train --auto-optimize sizes the micro-batch from the saved configuration, at the run's
    // own length; the rank and length stay the run's (the benchmark ran rank 4, length 32).
    let best = saved["best"].as_object().unwrap().values().next().unwrap();
    let tokens = best["batch_size"].as_u64().unwrap() * best["max_seq_length"].as_u64().unwrap();
    let o = r
        .train_command(&r.root.join("auto"))
        .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
        .args([
            "--max-steps",
            "1",
            "--auto-optimize",
            "--max-seq-length",
            "16",
        ])
        .arg("--no-mask-prompt")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("--auto-optimize: the benchmark's fastest was batch"),
        "{e}"
    );
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(r.root.join("auto/train_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(run["max_seq_length"], 16, "{run}");
    assert_eq!(run["lora_rank"], 16, "{run}");
    assert_eq!(run["batch_size"], (tokens / 16).max(1), "{run}");
    assert!(
        e.contains(&format!("--auto-optimize: batch {} at", tokens / 16)),
        "{e}"
    );
    // A batch size on the command line wins.
    let o = r
        .train_command(&r.root.join("auto-given"))
        .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
        .args(["--max-steps", "1", "--auto-optimize", "--batch-size", "1"])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(!e.contains("--auto-optimize: batch"), "{e}");
    // A saved best whose peak is over the budget given now is measured again, under it.
    let peak = saved["best"].as_object().unwrap().values().next().unwrap()["peak_bytes"]
        .as_f64()
        .unwrap();
    let budget = format!("{:.3}", peak / 1e9 - 0.001);
    let o = r
        .train_command(&r.root.join("auto-small"))
        .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
        .args([
            "--max-steps",
            "1",
            "--auto-optimize",
            "--max-memory",
            &budget,
        ])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(e.contains("saved yet within --max-memory"), "{e}");
    // The benchmark ran under that budget, where nothing fits this model.
    assert!(
        e.contains(&format!("Set memory limit to {:.2} GB", peak / 1e9 - 0.001)),
        "{e}"
    );
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("the benchmark found no configuration"), "{e}");

    // A child that crosses its budget is reported as over budget, not as a crash.
    let o = bench(&["--batch-sizes", "1"]);
    assert!(o.status.success());
    let o2 = common::cli()
        .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
        .arg("benchmark")
        .args(["--test-memory-limit", "1@0"])
        .arg("--model")
        .arg(&r.model)
        .args([
            "--batch-sizes",
            "1",
            "--lengths",
            "32",
            "--ranks",
            "4",
            "--steps",
            "1",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o2.stdout).into_owned();
    assert!(out.contains("over budget (measured)"), "{out}");
    assert!(out.contains("No configuration ran successfully"), "{out}");
    // A setting that does not exist is refused, naming the flag.
    let o = bench(&["--quantize", "none,3"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--quantize: `3`"), "{}", stderr(&o));
    // Over the budget by estimate: skipped without running.
    let o3 = bench(&["--max-memory", "0.001"]);
    let out = String::from_utf8_lossy(&o3.stdout).into_owned();
    assert!(out.contains("skipped: estimate over budget"), "{out}");

    let o = common::cli()
        .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
        .arg("recommend")
        .args(["--memory", "64"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    for (alias, _) in your_ai::model::source::ALIASES {
        assert!(out.contains(&format!("\n{alias} (")), "{alias}: {out}");
    }
    assert!(out.contains("starting from the 64 GB preset"), "{out}");
    let o = common::cli()
        .env("YOUR_AI_CONFIG_DIR", &cfg_dir)
        .arg("setup")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && out.contains("Saved the hardware and benchmark results to"),
        "{out}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg_dir.join("setup.json")).unwrap())
            .unwrap();
    assert_eq!(
        saved["best"].as_object().unwrap().len(),
        1,
        "setup keeps results"
    );
}
