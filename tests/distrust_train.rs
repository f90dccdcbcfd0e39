//! `your_ai train --distrust` as a user runs it, on a tiny model with SmolLM2's real tokenizer:
//! λ = 0 is plain training bit for bit, λ > 0 changes what is learned and reports the plain CE,
//! the weighted loss and the batch's mean D apart, bad rows and flags are refused by file:line
//! or flag, and a resume with another λ is refused.

mod common;

use common::{metrics, TinyRun};
use std::path::{Path, PathBuf};

/// Copies the run's data to `name/`, giving train row i the i-th (w, H) of `prov` (cycled);
/// `edit` may rewrite any row's JSON afterwards.
fn scored_data(
    r: &TinyRun,
    name: &str,
    prov: &[(f64, f64)],
    edit: impl Fn(usize, &mut serde_json::Value),
) -> PathBuf {
    let dir = r.root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let train = std::fs::read_to_string(r.data.join("train.jsonl")).unwrap();
    let lines: Vec<String> = train
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let (w, h) = prov[i % prov.len()];
            v["auth_weight"] = serde_json::json!(w);
            v["prov_entropy"] = serde_json::json!(h);
            edit(i, &mut v);
            v.to_string()
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::copy(r.data.join("valid.jsonl"), dir.join("valid.jsonl")).unwrap();
    dir
}

const PROV: &[(f64, f64)] = &[(0.05, 3.0), (0.9, 0.1), (0.5, 1.0), (0.3, 0.2)];

fn train(r: &TinyRun, data: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    r.train_command(&r.root.join(out))
        .args(["--data"])
        .arg(data)
        .args([
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--grad-accumulation-steps",
            "2",
            "--lora-rank",
            "4",
            "--learning-rate",
            "1e-3",
            "--warmup-steps",
            "1",
            "--steps-per-eval",
            "0",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "train failed: {stderr}");
    stderr
}

fn adapter(r: &TinyRun, out: &str) -> Vec<u8> {
    std::fs::read(r.root.join(out).join("adapter_model.safetensors")).unwrap()
}

#[test]
fn lambda_zero_is_plain_training_and_lambda_above_zero_acts() {
    let r = common::tiny_run(8);
    let scored = scored_data(&r, "scored", PROV, |_, _| {});
    ok(&train(&r, &r.data.clone(), "plain", &[]));
    let zero = ok(&train(&r, &scored, "zero", &["--lambda-weight", "0"]));
    assert!(zero.contains("distrust: alpha 2.7, lambda 0"), "{zero}");
    assert_eq!(
        adapter(&r, "plain"),
        adapter(&r, "zero"),
        "λ = 0 must be plain training"
    );
    let losses = |out: &str| -> Vec<u64> {
        metrics(&r.root.join(out).join("metrics.jsonl"), "train")
            .iter()
            .map(|m| m["loss"].as_f64().unwrap().to_bits())
            .collect()
    };
    assert_eq!(losses("plain"), losses("zero"));

    // On by default for scored rows (λ 0.6): another adapter, and the three figures apart.
    let on = ok(&train(&r, &scored, "on", &[]));
    assert_ne!(adapter(&r, "plain"), adapter(&r, "on"));
    assert!(on.contains("| weighted: "), "{on}");
    assert!(on.contains("| D: "), "{on}");
    let m = metrics(&r.root.join("on").join("metrics.jsonl"), "train");
    assert_eq!(m.len(), 3);
    for line in &m {
        let (loss, weighted, d) = (
            line["loss"].as_f64().unwrap(),
            line["weighted_loss"].as_f64().unwrap(),
            line["mean_d"].as_f64().unwrap(),
        );
        assert!(
            loss.is_finite() && weighted.is_finite() && d > 0.0,
            "{line}"
        );
        assert!(
            (loss - weighted).abs() > 1e-6,
            "weighting changed nothing: {line}"
        );
    }
    // The plain CE of the first step is that of plain training (same model, same batch).
    let plain_first = metrics(&r.root.join("plain").join("metrics.jsonl"), "train")[0]["loss"]
        .as_f64()
        .unwrap();
    assert_eq!(m[0]["loss"].as_f64().unwrap(), plain_first);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(r.root.join("on").join("train_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["distrust"]["lambda"], 0.6);
    assert_eq!(cfg["distrust"]["alpha"], 2.7);

    // --alpha scales the reported D; it cancels in D/mean(D), so the losses do not change.
    ok(&train(&r, &scored, "alpha", &["--alpha", "2.3"]));
    let ma = metrics(&r.root.join("alpha").join("metrics.jsonl"), "train");
    for (a, b) in ma.iter().zip(&m) {
        let ratio = a["mean_d"].as_f64().unwrap() / b["mean_d"].as_f64().unwrap();
        assert!((ratio - 2.3 / 2.7).abs() < 1e-5, "{ratio}");
        assert!(
            (a["weighted_loss"].as_f64().unwrap() - b["weighted_loss"].as_f64().unwrap()).abs()
                < 1e-4
        );
    }

    // Packed rows carry each document's weight and D.
    ok(&train(
        &r,
        &scored,
        "packed",
        &["--pack", "--batch-size", "1"],
    ));
    for line in metrics(&r.root.join("packed").join("metrics.jsonl"), "train") {
        assert!(line["mean_d"].as_f64().unwrap() > 0.0, "{line}");
        assert!(
            line["weighted_loss"].as_f64().unwrap().is_finite(),
            "{line}"
        );
    }

    // --no-distrust: plain training on scored rows.
    ok(&train(&r, &scored, "off", &["--no-distrust"]));
    assert_eq!(adapter(&r, "plain"), adapter(&r, "off"));
    assert!(
        metrics(&r.root.join("off").join("metrics.jsonl"), "train")[0]
            .get("weighted_loss")
            .is_none()
    );

    // A resume with another λ is refused; with the same one it continues.
    let o = train(
        &r,
        &scored,
        "on",
        &["--max-steps", "4", "--lambda-weight", "0.3", "--resume"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("distrust:") && err.contains("0.3"), "{err}");
    ok(&train(&r, &scored, "on", &["--max-steps", "4", "--resume"]));
}

#[test]
fn bad_rows_and_flags_are_refused_with_file_line_or_flag() {
    let r = common::tiny_run(4);
    let fail = |data: &Path, extra: &[&str], needles: &[&str]| {
        let o = train(&r, data, "bad", extra);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{extra:?} should fail");
        for n in needles {
            assert!(err.contains(n), "missing `{n}` in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !r.root.join("bad").exists(),
            "nothing written for bad input"
        );
    };
    let range = scored_data(&r, "range", PROV, |i, v| {
        if i == 1 {
            v["auth_weight"] = serde_json::json!(1.5);
        }
        if i == 3 {
            v["prov_entropy"] = serde_json::json!(-0.5);
        }
    });
    fail(
        &range,
        &[],
        &[
            "train.jsonl:2: `auth_weight` 1.5 is outside [0, 0.99]",
            "train.jsonl:4: `prov_entropy` -0.5",
        ],
    );
    let missing = scored_data(&r, "missing", PROV, |i, v| {
        if i == 2 {
            v.as_object_mut().unwrap().remove("prov_entropy");
        }
        if i == 3 {
            v["auth_weight"] = serde_json::json!("high");
        }
    });
    fail(
        &missing,
        &[],
        &[
            "train.jsonl:3: has `auth_weight` but no `prov_entropy`",
            "train.jsonl:4: `auth_weight` must be a number",
        ],
    );
    // --distrust on rows without the fields names the first line and the fix.
    fail(
        &r.data.clone(),
        &["--distrust"],
        &[
            "train.jsonl:1: no `auth_weight`",
            "your_ai score",
            "--no-distrust",
        ],
    );
    let good = scored_data(&r, "good", PROV, |_, _| {});
    fail(&good, &["--alpha", "3.5"], &["--alpha 3.5", "[2.3, 3]"]);
    fail(
        &good,
        &["--lambda-weight", "1.5"],
        &["--lambda-weight 1.5", "[0, 1]"],
    );
}
