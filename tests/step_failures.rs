//! `your_ai train` when steps go wrong, as a user runs it: skipped steps (nothing to train, a
//! non-finite loss), a run that diverges, and one that trains nothing.

mod common;

use common::metrics;

fn setup(n_train: usize) -> common::TinyRun {
    common::tiny_run(n_train)
}

#[test]
fn non_finite_steps_are_skipped_and_three_in_a_row_stop_the_run() {
    let s = setup(8);
    let out = s.root.join("diverge");
    // A learning rate this large overflows the adapter within a step or two.
    let o = s
        .train_command(&out)
        .args([
            "--max-steps",
            "20",
            "--batch-size",
            "2",
            "--lora-rank",
            "4",
            "--learning-rate",
            "1e30",
        ])
        .args([
            "--warmup-steps",
            "0",
            "--lr-schedule",
            "constant",
            "--max-grad-norm",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    // Its own exit code: not a success, not a bad command line (2).
    assert_eq!(o.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("training diverged"), "{stderr}");
    assert!(stderr.contains("update skipped"), "{stderr}");
    assert!(
        stderr.contains("3 steps in a row had a non-finite loss"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    let steps = metrics(&out.join("metrics.jsonl"), "train").len();
    assert!(steps < 20, "stopped early, after {steps} steps");
}

#[test]
fn skipped_steps_have_no_loss_and_a_run_that_trained_nothing_fails() {
    let s = setup(1);
    // One example that trains, and fifteen of distrust weight 0: with λ = 1 an example's weight
    // is D_i / D̄, and D = α·(ln(1 − w + 1e-8) + H)² is exactly 0 where H cancels the log.
    let zero_h = -(1.0f64 - 0.5 + 1e-8).ln();
    let row = |user: &str, w: f64, h: f64| {
        serde_json::json!({"messages": [{"role": "user", "content": user},
            {"role": "assistant", "content": "A box."}], "auth_weight": w, "prov_entropy": h})
        .to_string()
    };
    let rows: Vec<String> = std::iter::once(row("Hi?", 0.99, 0.0))
        .chain((0..15).map(|i| row(&format!("Why {i}?"), 0.5, zero_h)))
        .collect();
    std::fs::write(s.data.join("train.jsonl"), rows.join("\n") + "\n").unwrap();
    let run = |name: &str, seed: usize, steps: usize| {
        let out = s.root.join(name);
        let o = s
            .train_command(&out)
            .args([
                "--lambda-weight",
                "1",
                "--batch-size",
                "1",
                "--lora-rank",
                "2",
            ])
            .args(["--steps-per-eval", "0", "--val-batches", "0"])
            .args([
                "--seed",
                &seed.to_string(),
                "--max-steps",
                &steps.to_string(),
            ])
            .output()
            .unwrap();
        (o, out)
    };
    // One epoch visits the one example that trains: the run succeeds, and the other steps
    // record no loss (null), with the reason.
    let (seed, first_trained) = (1..10)
        .find_map(|seed| {
            let (o, out) = run(&format!("epoch-{seed}"), seed, 16);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let m = metrics(&out.join("metrics.jsonl"), "train");
            let trained: Vec<&serde_json::Value> =
                m.iter().filter(|l| l["loss"].is_f64()).collect();
            assert_eq!(trained.len(), 1, "{m:?}");
            assert!(trained[0].get("skipped").is_none());
            for l in m.iter().filter(|l| !l["loss"].is_f64()) {
                assert!(l["loss"].is_null() && l["grad_norm"].is_null(), "{l}");
                assert_eq!(l["skipped"], "no trained tokens", "{l}");
            }
            let k = trained[0]["step"].as_u64().unwrap() as usize;
            (k > 1).then_some((seed, k))
        })
        .unwrap();
    // The same order stopped before that step trains nothing: a failure, and no adapter.
    let (o, out) = run("none", seed, first_trained - 1);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no step updated the adapter"), "{stderr}");
    assert!(stderr.contains("loss: - |"), "{stderr}");
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.join("best").exists());
}
