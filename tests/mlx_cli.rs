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
    // Under --keep-activations auto and room to spare, every adapted block keeps its frozen
    // products: the run below (and its resume) differentiates on them.
    assert!(
        stderr.contains("activations: 2 of 2 adapted blocks keep theirs"),
        "the blocks keep their activations:\n{stderr}"
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

    // Resume from the step-10 checkpoint into another output (its own holds the later ones):
    // steps 11..20 again, the same losses bit for bit.
    let ckpt = mlx.join("checkpoints/step-10");
    let again = r.root.join("again");
    train(&r, &again, "mlx", &["--resume", ckpt.to_str().unwrap()]);
    assert_eq!(losses(&again), lm[10..], "the resumed run differs");
    // On the other engine it goes on, and says the losses will differ in the last digits.
    let other = r.root.join("other");
    let stderr = train(&r, &other, "candle", &["--resume", ckpt.to_str().unwrap()]);
    assert!(
        stderr.contains(r#"engine: "mlx" → "candle"; the engines agree to about 1e-4"#),
        "{stderr}"
    );
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

/// Rows of plain text at least `words` words long (a word is at least one token), so every
/// row is cut to `--max-seq-length`.
fn long_rows(dir: &Path, words: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let vocab = [
        "the",
        "river",
        "Marrowick",
        "carries",
        "salt",
        "north",
        "through",
        "seven",
        "valleys",
        "where",
        "weavers",
        "sell",
        "blue",
        "cloth",
        "at",
        "dawn",
    ];
    let text: String = (0..16)
        .map(|r| {
            let row: Vec<&str> = (0..words)
                .map(|k| vocab[(r * 7 + k * 5 + k / 3) % vocab.len()])
                .collect();
            format!("{}\n", serde_json::json!({ "text": row.join(" ") }))
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), text).unwrap();
}

/// The pre-flight estimate of an MLX run (`train --engine mlx`) on SmolLM2 bounds what the run
/// measured, the process's resident peak (MLX's cache included) and MLX's own, and is not far
/// above it: a head-bound shape (two LM-head chunks), an attention-bound one, and one whose
/// resident peak went past the estimate while MLX's cache was limited by the budget alone.
#[test]
fn mlx_estimate_bounds_the_measured_peak_on_smollm2() {
    let tmp = tempfile::tempdir().unwrap();
    long_rows(&tmp.path().join("data"), 1100);
    // The second shape recomputes every block; the others keep their frozen products (auto).
    for (batch, len, rank, keep) in [
        ("2", "256", "8", "auto"),
        ("1", "512", "32", "none"),
        ("4", "256", "64", "auto"),
    ] {
        let out = tmp.path().join(format!("run-{batch}-{len}"));
        let o = common::cli()
            .args(["train", "--engine", "mlx", "--device", "cpu", "--model"])
            .arg(common::smollm2())
            .arg("--data")
            .arg(tmp.path().join("data"))
            .arg("--output")
            .arg(&out)
            .args(["--batch-size", batch, "--max-seq-length", len])
            .args(["--lora-rank", rank, "--max-steps", "2", "--max-memory", "8"])
            .args(["--keep-activations", keep])
            .args([
                "--steps-per-eval",
                "0",
                "--save-every",
                "0",
                "--no-save-best",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let start = &metrics(&out.join("metrics.jsonl"), "start")[0];
        let steps = metrics(&out.join("metrics.jsonl"), "train");
        let peak_of = |key: &str| steps.iter().filter_map(|s| s[key].as_u64()).max().unwrap();
        let rss =
            peak_of("train_peak_rss_bytes").max(start["load_peak_rss_bytes"].as_u64().unwrap());
        let mlx = peak_of("train_peak_mlx_bytes");
        let estimate = start["estimate_peak_bytes"].as_u64().unwrap();
        let train_estimate = start["estimate_train_peak_bytes"].as_u64().unwrap();
        let what = format!(
            "{batch}×{len} r{rank} keep {keep}: estimate {estimate}, resident peak {rss}, MLX peak {mlx}"
        );
        assert!(rss <= estimate, "under the resident peak: {what}");
        assert!(mlx <= train_estimate, "under MLX's peak: {what}");
        assert!(
            (estimate as f64) <= 1.35 * rss as f64,
            "far above the resident peak: {what}"
        );
    }
}

/// `estimate --engine mlx` prints the table `train --engine mlx` plans with, for the same model
/// and flags: MLX's own model, not the candle engine's.
#[test]
fn mlx_estimate_and_train_agree_and_differ_from_candle() {
    let tmp = tempfile::tempdir().unwrap();
    long_rows(&tmp.path().join("data"), 300);
    let flags = [
        "--batch-size",
        "2",
        "--max-seq-length",
        "128",
        "--lora-rank",
        "8",
        "--max-memory",
        "8",
    ];
    let estimate_with = |engine: &str, extra: &[&str]| {
        let e = common::cli()
            .args(["estimate", "--engine", engine, "--model"])
            .arg(common::smollm2())
            .args(flags)
            .args(extra)
            .output()
            .unwrap();
        assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
        common::estimate_table(&String::from_utf8_lossy(&e.stdout))
    };
    let estimate = |engine: &str| estimate_with(engine, &[]);
    let t = common::cli()
        .args(["train", "--engine", "mlx", "--device", "cpu", "--model"])
        .arg(common::smollm2())
        .arg("--data")
        .arg(tmp.path().join("data"))
        .arg("--output")
        .arg(tmp.path().join("out"))
        .args(["--max-steps", "1"])
        .args(flags)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&t.stderr).to_string();
    assert!(t.status.success(), "{stderr}");
    let (mlx, candle) = (estimate("mlx"), estimate("candle"));
    assert!(mlx.len() >= 7, "{mlx:?}");
    assert!(mlx[1].contains("MLX"), "{mlx:?}");
    assert_eq!(mlx, common::estimate_table(&stderr));
    assert_ne!(mlx, candle);
    // SmolLM2's Q4_1 linears are held at their own 4 bits, whatever --quantize asks for (with
    // an f32 scale and bias per 32 weights on the CPU: 6 bits a weight).
    let held = |bits: &str| estimate_with("mlx", &["--quantize", bits])[1].clone();
    assert_eq!(held("8"), held("4"));
    assert!(held("8").contains("6.0-bit linears"), "{}", held("8"));
}

/// `--device cuda --engine mlx` on an MLX without CUDA (the mlx-cpu wheel here) is refused
/// before anything is loaded or written, naming the build that has it; `--device auto` runs
/// on MLX's CPU.
#[test]
fn mlx_refuses_a_device_its_build_lacks() {
    let r = tiny_run(8);
    let out = r.root.join("cuda");
    let o = r
        .train_command(&out)
        .args(["--engine", "mlx", "--device", "cuda", "--max-steps", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a CUDA run on the CPU wheel ran:\n{stderr}"
    );
    assert!(
        stderr.contains("--device cuda --engine mlx") && stderr.contains("build_mlx.sh --cuda"),
        "{stderr}"
    );
    assert!(!out.exists(), "the refused run wrote {}", out.display());

    // `auto` is the CPU here, in f32: the same losses as an explicit `--device cpu` run.
    let run = |device: &str| {
        let out = r.root.join(device);
        let o = r
            .train_command(&out)
            .args(["--engine", "mlx", "--device", device, "--max-steps", "2"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        losses(&out)
    };
    assert_eq!(run("auto"), run("cpu"));
}
