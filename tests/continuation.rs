//! Continuing a run, as a user does: a finished run extended with `--resume --max-steps N`
//! ends as a run of N steps from the start would, `best/` included; a checkpoint is continued
//! only where nothing would be mixed with it, and an adapter cut short while written is finished.

mod common;

use common::metrics;
use std::path::Path;

fn train(r: &common::TinyRun, out: &Path, steps: usize, extra: &[&str]) -> std::process::Output {
    r.train_command(out)
        .args([
            "--max-steps",
            &steps.to_string(),
            "--batch-size",
            "2",
            "--lora-rank",
            "4",
        ])
        .args([
            "--learning-rate",
            "2e-3",
            "--lr-schedule",
            "constant",
            "--warmup-steps",
            "0",
        ])
        .args([
            "--steps-per-eval",
            "3",
            "--save-every",
            "100",
            "--seed",
            "5",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: std::process::Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    e
}

#[test]
fn an_extended_run_keeps_the_best_adapter_of_the_whole_run() {
    let r = common::tiny_run(12);
    let (short, whole) = (r.root.join("short"), r.root.join("whole"));
    ok(train(&r, &short, 7, &[]));
    // The last step's checkpoint knows that step's validation (it was done after the save, so
    // an extension could replace best/ with a worse, later adapter).
    let evals = metrics(&short.join("metrics.jsonl"), "eval");
    let best = evals
        .iter()
        .map(|e| (e["step"].as_u64().unwrap(), e["val_loss"].as_f64().unwrap()))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(short.join("checkpoints/step-7/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["best_val"],
        serde_json::json!([best.0, best.1]),
        "{evals:?}"
    );
    ok(train(&r, &short, 10, &["--resume"]));
    ok(train(&r, &whole, 10, &[]));
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    for f in [
        "adapter_model.safetensors",
        "best/adapter_model.safetensors",
    ] {
        assert!(read(&short, f) == read(&whole, f), "{f} differs");
    }
    let records = |d: &Path, kind: &str| metrics(&d.join("metrics.jsonl"), kind);
    // The same validations, and the first run's last.
    let mut evals = records(&short, "eval");
    evals.retain(|e| e["step"] != 7);
    assert_eq!(evals, records(&whole, "eval"));
    // One end: the first run's test and end records went with its finish.
    assert_eq!(records(&short, "end").len(), 1);
}

#[test]
fn a_checkpoint_is_continued_only_where_nothing_would_be_mixed_with_it() {
    let r = common::tiny_run(12);
    let (a, b) = (r.root.join("a"), r.root.join("b"));
    ok(train(&r, &a, 4, &["--save-every", "2"]));
    ok(train(&r, &b, 3, &[]));
    let step2 = a.join("checkpoints/step-2");
    let before = std::fs::read(b.join("adapter_model.safetensors")).unwrap();
    // Into another run's output: its adapter, best/ and metrics were overwritten and its
    // checkpoints mixed with these.
    let o = train(&r, &b, 4, &["--resume", step2.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("another output's") && e.contains("is not empty"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(b.join("adapter_model.safetensors")).unwrap(),
        before
    );
    // In its own output, behind a later checkpoint of the same run: refused, nothing changed.
    let o = train(&r, &a, 4, &["--resume", step2.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("later checkpoints of this run (step-4)"), "{e}");
    // Into an empty output: continued, to the original run's end; and into one where such a
    // continuation was killed before its first checkpoint (its metrics alone are there).
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    for (name, left) in [("c", None), ("d", Some("metrics.jsonl"))] {
        let c = r.root.join(name);
        if let Some(f) = left {
            std::fs::create_dir_all(&c).unwrap();
            std::fs::write(
                c.join(f),
                "{\"memory_budget_bytes\":1,\"type\":\"start\"}\n",
            )
            .unwrap();
        }
        ok(train(&r, &c, 4, &["--resume", step2.to_str().unwrap()]));
        assert!(read(&c) == read(&a), "{name}");
    }
    // Its own checkpoint named relative to where the user stands is its own.
    let o = common::cli()
        .current_dir(a.join("checkpoints"))
        .args(["train", "--model"])
        .arg(&r.model)
        .arg("--data")
        .arg(&r.data)
        .args([
            "--output",
            "..",
            "--resume",
            "step-4",
            "--max-steps",
            "5",
            "--batch-size",
            "2",
        ])
        .args([
            "--lora-rank",
            "4",
            "--learning-rate",
            "2e-3",
            "--lr-schedule",
            "constant",
        ])
        .args([
            "--warmup-steps",
            "0",
            "--steps-per-eval",
            "3",
            "--save-every",
            "2",
        ])
        .args(["--seed", "5"])
        .output()
        .unwrap();
    ok(o);
    // A damaged later checkpoint does not stop the resume that load's message offers.
    let f = a.join("checkpoints/step-5/optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[10] ^= 0x55;
    std::fs::write(&f, bytes).unwrap();
    let step4 = a.join("checkpoints/step-4");
    ok(train(&r, &a, 5, &["--resume", step4.to_str().unwrap()]));
}

/// A checkpoint that becomes the run's last (the run shortened to it on resume) gets the final
/// validation it never had; it was skipped once that validation came before the checkpoint.
#[test]
fn a_run_shortened_on_resume_still_ends_with_its_validation() {
    let r = common::tiny_run(12);
    let out = r.root.join("short");
    // The budget crossed at step 5: the checkpoint of step 4, not a validation step.
    let o = train(
        &r,
        &out,
        8,
        &["--save-every", "2", "--test-memory-limit", "1@5"],
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(train(&r, &out, 4, &["--resume"]));
    let steps: Vec<u64> = metrics(&out.join("metrics.jsonl"), "eval")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 3, 4]);
}

/// A resume checks the model's content, not only its path: other weights there (a
/// re-download, a re-quantization, damage) would continue a run they did not start.
#[test]
fn a_resume_with_other_weights_at_the_same_path_is_refused() {
    let r = common::tiny_run(12);
    let out = r.root.join("run");
    ok(train(&r, &out, 2, &[]));
    let weights = r.model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 100..].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&weights, bytes).unwrap();
    let o = train(&r, &out, 4, &["--resume"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("model: its files changed since the checkpoint"),
        "{e}"
    );
}

/// `your_ai eval --adapter DIR`'s loss on the run's data.
fn eval_loss(r: &common::TinyRun, adapter: &Path) -> String {
    let o = common::cli()
        .arg("eval")
        .arg("--model")
        .arg(&r.model)
        .arg("--data")
        .arg(&r.data)
        .arg("--adapter")
        .arg(adapter)
        .output()
        .unwrap();
    ok(o.clone());
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    stdout
        .lines()
        .find(|l| l.starts_with("loss: "))
        .unwrap()
        .to_string()
}

/// A run killed while moving its final adapter's files into --output (beside metrics and
/// checkpoints) leaves the rest of the set committed under a hidden name: the next load, or
/// the next start there, puts them in place, so no mix of two adapters is ever read.
#[test]
fn adapter_files_cut_short_while_moving_in_are_finished_by_the_next_reader() {
    let r = common::tiny_run(8);
    let (out, other) = (r.root.join("a"), r.root.join("b"));
    ok(train(&r, &out, 2, &[]));
    ok(train(&r, &other, 3, &[]));
    let planted = || {
        // As a kill leaves it: the new adapter's other files are in, its weights are not.
        let set = out.join(".adapter.commit-4000000");
        std::fs::create_dir(&set).unwrap();
        let weights = "adapter_model.safetensors";
        std::fs::copy(other.join(weights), set.join(weights)).unwrap();
        set
    };
    let set = planted();
    assert_eq!(eval_loss(&r, &out), eval_loss(&r, &other));
    assert!(!set.exists());
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(other.join("adapter_model.safetensors")).unwrap()
    );
    // At a run's start in that output (here, extending it).
    let set = planted();
    let e = ok(train(&r, &out, 3, &["--resume"]));
    assert!(
        e.contains("finished putting in place the adapter files"),
        "{e}"
    );
    assert!(!set.exists());
}

/// `--resume` on a run that finished does nothing and succeeds, so a retry loop around it
/// ends; it used to evaluate the adapter again and append start, test and end records.
#[test]
fn a_finished_run_resumed_again_is_left_as_it_is() {
    let r = common::tiny_run(8);
    let out = r.root.join("done");
    ok(train(&r, &out, 3, &[]));
    let files = [
        "metrics.jsonl",
        "adapter_model.safetensors",
        "adapter_config.json",
    ];
    let read = || files.map(|f| std::fs::read(out.join(f)).unwrap());
    let before = read();
    let e = ok(train(&r, &out, 3, &["--resume"]));
    assert!(
        e.contains("already finished (step 3 of 3); nothing to do"),
        "{e}"
    );
    assert!(!e.contains("resuming from"), "{e}");
    assert!(read() == before, "the finished run's files changed");
    // Told before the model loads (minutes, for a large one), as is a resume that differs.
    assert!(!e.contains("model loaded"), "{e}");
    let o = train(&r, &out, 4, &["--resume", "--lora-dropout", "0.1"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("differs from the checkpoint"),
        "{e}"
    );
    assert!(!e.contains("model loaded"), "{e}");
    // Raised, it trains on.
    let e = ok(train(&r, &out, 4, &["--resume"]));
    assert!(
        e.contains("resuming from") && e.contains("model loaded"),
        "{e}"
    );
    assert_eq!(metrics(&out.join("metrics.jsonl"), "train").len(), 4);
}
