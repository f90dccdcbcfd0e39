//! `your_ai train --engine mlx` as a user runs it, on a tiny random Llama with SmolLM2's
//! tokenizer and a chat dataset: the candle engine's losses over 20 steps, the adapter files,
//! MLX's memory in the metrics, and an exact resume from its checkpoint. Built only with the
//! `mlx` feature.
#![cfg(feature = "mlx")]

mod common;

use common::{metrics, tiny_run, TinyRun};
use std::path::{Path, PathBuf};

fn train(r: &TinyRun, out: &Path, engine: &str, extra: &[&str]) -> String {
    let o = r
        .train_command(out)
        .args(["--engine", engine, "--device", "cpu", "--max-steps", "20"])
        .args([
            "--batch-size",
            "2",
            "--max-seq-length",
            "64",
            "--lora-rank",
            "4",
        ])
        .args([
            "--learning-rate",
            "5e-3",
            "--steps-per-eval",
            "10",
            "--save-every",
            "10",
        ])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{engine} run failed:\n{stderr}");
    stderr
}

fn losses(out: &Path) -> Vec<f64> {
    metrics(&out.join("metrics.jsonl"), "train")
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn mlx_train_cli_matches_candle_writes_the_adapter_and_resumes_exactly() {
    let r = tiny_run(24);
    let (candle, mlx): (PathBuf, PathBuf) = (r.root.join("candle"), r.root.join("mlx"));
    train(&r, &candle, "candle", &[]);
    let stderr = train(&r, &mlx, "mlx", &[]);
    assert!(
        stderr.contains("Set MLX memory limit to"),
        "the run says what MLX's limit is:\n{stderr}"
    );
    assert!(
        stderr.contains(" (peak ") && stderr.contains(", cache "),
        "the progress line shows MLX's peak and cache:\n{stderr}"
    );
    let (lc, lm) = (losses(&candle), losses(&mlx));
    assert_eq!(lm.len(), 20);
    for (i, (a, b)) in lm.iter().zip(&lc).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "step {}: MLX {a} vs candle {b}\nMLX {lm:?}\ncandle {lc:?}",
            i + 1
        );
    }
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(mlx.join(f).is_file(), "{f} missing");
    }
    let step = &metrics(&mlx.join("metrics.jsonl"), "train")[19];
    for key in [
        "mlx_active_bytes",
        "train_peak_mlx_bytes",
        "mlx_cache_bytes",
    ] {
        assert!(step[key].as_u64().is_some(), "{key} missing in {step}");
    }

    // Resume from the step-10 checkpoint: steps 11..20 again, the same losses bit for bit.
    let ckpt = mlx.join("checkpoints/step-10");
    let ckpt = ckpt.to_str().unwrap();
    train(&r, &mlx, "mlx", &["--resume", ckpt]);
    assert_eq!(losses(&mlx), lm, "the resumed run differs");
}

/// `train --engine mlx --method dpo` on SmolLM2 and the shipped preference set gives the candle
/// engine's per-step losses and validation (the reference pass included), within 1e-3.
#[test]
fn mlx_dpo_cli_matches_candle() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invented-country-preferences");
    let run = |engine: &str| -> PathBuf {
        let out = tmp.path().join(engine);
        let o = common::cli()
            .args([
                "train", "--method", "dpo", "--engine", engine, "--device", "cpu",
            ])
            .arg("--model")
            .arg(common::smollm2())
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&out)
            .args([
                "--max-steps",
                "6",
                "--batch-size",
                "1",
                "--learning-rate",
                "1e-4",
            ])
            .args([
                "--num-layers",
                "4",
                "--steps-per-eval",
                "6",
                "--val-batches",
                "2",
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{engine}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let (candle, mlx) = (run("candle"), run("mlx"));
    let (lc, lm) = (losses(&candle), losses(&mlx));
    assert_eq!(lm.len(), 6);
    for (i, (a, b)) in lm.iter().zip(&lc).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs(),
            "step {}: MLX {a} vs candle {b}\nMLX {lm:?}\ncandle {lc:?}",
            i + 1
        );
    }
    let val = |out: &Path| {
        metrics(&out.join("metrics.jsonl"), "eval")
            .iter()
            .map(|m| m["val_loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let (vc, vm) = (val(&candle), val(&mlx));
    assert_eq!(vm.len(), vc.len());
    for (a, b) in vm.iter().zip(&vc) {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs(),
            "validation: MLX {vm:?} vs candle {vc:?}"
        );
    }
}
