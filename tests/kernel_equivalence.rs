//! The fused CPU kernels change speed, not results: SmolLM2 trained with them and with every op
//! on candle's composite path (`YOUR_AI_NO_KERNELS=1`, the code before the kernels) gives the
//! same training losses step after step and adapters with the same validation loss, within
//! float tolerance.

mod common;

use common::{cli, metrics, smollm2};

/// Per-step training losses, and the validation loss before and after training.
fn run(no_kernels: bool, dir: &std::path::Path) -> (Vec<f64>, f64, f64) {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invented-country");
    let out = dir.join(if no_kernels { "composite" } else { "kernels" });
    let mut c = cli();
    if no_kernels {
        c.env("YOUR_AI_NO_KERNELS", "1");
    }
    c.args(["train", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--max-seq-length",
            "256",
            "--lora-rank",
            "8",
            "--learning-rate",
            "5e-4",
            "--lr-schedule",
            "constant",
            "--warmup-steps",
            "0",
            "--steps-per-eval",
            "0",
            "--no-save-best",
        ])
        .assert()
        .success();
    let m = out.join("metrics.jsonl");
    let train = metrics(&m, "train")
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    let val: Vec<f64> = metrics(&m, "eval")
        .iter()
        .map(|r| r["val_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(val.len(), 2, "an evaluation before and after training");
    (train, val[0], val[1])
}

#[test]
fn kernels_and_composite_ops_train_to_the_same_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let (fused, f0, f1) = run(false, tmp.path());
    let (composite, c0, c1) = run(true, tmp.path());
    assert_eq!(fused.len(), 6);
    assert_eq!(fused.len(), composite.len());
    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs();
    for (step, (a, b)) in fused.iter().zip(&composite).enumerate() {
        assert!(
            close(*a, *b, 2e-4),
            "step {}: training loss {a} with the kernels, {b} without",
            step + 1
        );
    }
    assert!(close(f0, c0, 1e-5), "base validation loss {f0} vs {c0}");
    // The adapters are compared by what they do, not element by element: AdamW's first update
    // is ±lr whatever a gradient's size (m/√v = g/|g|), so an element whose gradient is within
    // rounding of 0 moves by lr one way or the other (measured after one step: 2 to 10
    // elements of a 4608-element B), with no effect on the loss.
    assert!(close(f1, c1, 2e-4), "trained validation loss {f1} vs {c1}");
    assert!(
        f1 < f0 - 0.05,
        "training moved the validation loss: {f0} -> {f1}"
    );
}
