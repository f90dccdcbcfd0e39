//! Preference tuning through the CLI, as a user runs it: `train --method dpo|orpo` on the
//! shipped preference set and SmolLM2 (held-out reward accuracy from the all-ties start to at
//! least 80% in 60 steps), `eval --method dpo` agreeing with the run's own validation, exact
//! resume, and bad preference rows named by file:line with nothing written.

mod common;

use common::{cli, metrics, smollm2};
use serde_json::json;
use std::path::{Path, PathBuf};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invented-country-preferences")
}

/// The number after `label` on a line of `out` (`accuracy: 87.5% …`).
fn figure(out: &str, label: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"));
    line[label.len()..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

fn eval_dpo(adapter: Option<&Path>, data: &Path) -> String {
    let mut c = cli();
    c.args(["eval", "--method", "dpo", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(data);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn dpo_on_smollm2_lifts_held_out_reward_accuracy_to_80_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = cli()
        .args(["train", "--method", "dpo", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(example())
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "60",
            "--batch-size",
            "1",
            "--learning-rate",
            "1e-4",
        ])
        .args(["--steps-per-eval", "30", "--test"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("acc: ") && err.contains("margin: "), "{err}");
    let evals = metrics(&out.join("metrics.jsonl"), "eval");
    // At the start the policy is the reference: every reward is 0, a tie, and the loss log 2.
    assert_eq!(evals[0]["step"], 0);
    assert_eq!(evals[0]["val_reward_accuracy"], 0.0);
    assert!((evals[0]["val_loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-4);
    let last = evals.last().unwrap();
    assert_eq!(last["step"], 60);
    let accuracy = last["val_reward_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.8, "held-out accuracy {accuracy}");
    assert!(last["val_loss"].as_f64().unwrap() < 0.6);
    let train = metrics(&out.join("metrics.jsonl"), "train");
    assert_eq!(train.len(), 60);
    for key in [
        "reward_accuracy",
        "reward_margin",
        "chosen_reward",
        "rejected_reward",
    ] {
        assert!(train[59][key].is_number(), "{key}: {}", train[59]);
    }
    let test = &metrics(&out.join("metrics.jsonl"), "test")[0];
    assert!(
        test["test_reward_accuracy"].as_f64().unwrap() >= 0.8,
        "{test}"
    );

    // `eval --method dpo` on the validation file: the run's own figures.
    let shown = eval_dpo(Some(&out), &example().join("valid.jsonl"));
    assert!(
        shown.contains("dpo loss: ") && shown.contains("accuracy: "),
        "{shown}"
    );
    let loss = figure(&shown, "dpo loss: ");
    assert!(
        (loss - last["val_loss"].as_f64().unwrap()).abs() < 1e-3,
        "eval {loss} vs the run's {last}"
    );
    assert!((figure(&shown, "accuracy: ") / 100.0 - accuracy).abs() < 1e-3);
    assert!(figure(&shown, "margin: ") > 0.0);
    // Without an adapter the policy is the reference.
    let base = eval_dpo(None, &example().join("valid.jsonl"));
    assert!(
        (figure(&base, "dpo loss: ") - 2f64.ln()).abs() < 1e-4,
        "{base}"
    );
    assert_eq!(figure(&base, "accuracy: "), 0.0);
}

/// A tiny preference set in the conversational form, and its valid file.
fn tiny_pairs(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let row = |i: usize| {
        json!({
            "prompt": [{"role": "user", "content": format!("What colour is box {i}?")}],
            "chosen": [{"role": "assistant", "content": format!("Box {i} is blue.")}],
            "rejected": [{"role": "assistant", "content": format!("Box {i} is a red cube.")}],
        })
        .to_string()
    };
    let lines = |r: std::ops::Range<usize>| r.map(row).collect::<Vec<_>>().join("\n") + "\n";
    std::fs::write(dir.join("train.jsonl"), lines(0..n)).unwrap();
    std::fs::write(dir.join("valid.jsonl"), lines(100..103)).unwrap();
    dir.to_path_buf()
}

fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    cli()
        .arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
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
            "2",
            "--seed",
            "5",
            "--steps-per-eval",
            "4",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// Stopped at step 4 (a memory budget crossed on demand: the checkpoint is step 3's) and
/// resumed, a DPO or ORPO run ends with the uninterrupted run's adapter and losses, bit for bit.
#[test]
fn a_resumed_preference_run_equals_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&tmp.path().join("model"));
    let data = tiny_pairs(&tmp.path().join("data"), 7);
    for method in ["dpo", "orpo"] {
        let whole = tmp.path().join(format!("{method}-whole"));
        let parts = tmp.path().join(format!("{method}-parts"));
        let m = ["--method", method, "--beta", "0.2", "--max-steps", "8"];
        let o = train(&model, &data, &whole, &m);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = train(
            &model,
            &data,
            &parts,
            &[&m[..], &["--test-memory-limit", "1@4"]].concat(),
        );
        assert_eq!(
            o.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let o = train(&model, &data, &parts, &[&m[..], &["--resume"]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bits = |out: &Path| -> Vec<u64> {
            metrics(&out.join("metrics.jsonl"), "train")
                .iter()
                .map(|l| l["loss"].as_f64().unwrap().to_bits())
                .collect()
        };
        assert_eq!(bits(&whole).len(), 8);
        assert_eq!(bits(&whole), bits(&parts), "{method}");
        let adapter = |out: &Path| std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        assert_eq!(adapter(&whole), adapter(&parts), "{method}");
        let last = metrics(&whole.join("metrics.jsonl"), "train")[7].clone();
        assert_eq!(last["method"], method);
        assert_eq!(last["nll"].is_number(), method == "orpo", "{last}");
        // A resume under another method is refused.
        let other = if method == "dpo" { "orpo" } else { "dpo" };
        let o = train(
            &model,
            &data,
            &whole,
            &["--method", other, "--max-steps", "9", "--resume"],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("method: \"{method}\" → \"{other}\"")),
            "{err}"
        );
    }
}

#[test]
fn bad_preference_rows_are_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&tmp.path().join("model"));
    let data = tiny_pairs(&tmp.path().join("data"), 4);
    let mut text = std::fs::read_to_string(data.join("train.jsonl")).unwrap();
    text.push_str("{\"prompt\": \"Q\", \"chosen\": \"A\"}\n");
    text.push_str("{\"prompt\": \"Q\", \"chosen\": \"Same\", \"rejected\": \"Same\"}\n");
    text.push_str(
        &json!({
            "chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}],
        })
        .to_string(),
    );
    text.push('\n');
    std::fs::write(data.join("train.jsonl"), text).unwrap();
    let out = tmp.path().join("out");
    let o = train(
        &model,
        &data,
        &out,
        &["--method", "dpo", "--max-steps", "2"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    // Bad data exits 1, as for SFT (2 is a bad command line).
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("train.jsonl:5: `rejected` is missing"),
        "{err}"
    );
    assert!(
        err.contains("train.jsonl:6: chosen and rejected are identical"),
        "{err}"
    );
    assert!(
        err.contains("train.jsonl:7: the prompts differ between chosen and rejected"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for bad data");
    // Flags preference tuning does not take.
    let data = tiny_pairs(&tmp.path().join("data2"), 4);
    for (extra, needle) in [
        (&["--pack"][..], "--pack with --method dpo"),
        (&["--beta", "0"][..], "--beta 0"),
    ] {
        let o = train(
            &model,
            &data,
            &out,
            &[&["--method", "dpo", "--max-steps", "2"][..], extra].concat(),
        );
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains(needle));
    }
    // SFT data given to --method dpo: every line names what is missing.
    let sft = common::write_chat_data(&tmp.path().join("sft"), 3);
    let o = train(&model, &sft, &out, &["--method", "dpo", "--max-steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("train.jsonl:1: `chosen` is missing"), "{err}");
    // And preference pairs given to supervised training: named as such, with the flag to use.
    let o = train(&model, &data, &out, &["--max-steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("train.jsonl:1: a preference pair") && err.contains("--method dpo"),
        "{err}"
    );
}

/// A pair whose prompt fills --max-seq-length, or whose answers it cuts to the same tokens, has
/// no preference left to learn: it is left out and named; with no pair left, the run is refused
/// before anything is written.
#[test]
fn a_pair_cut_off_by_the_length_is_left_out_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&tmp.path().join("model"));
    let data = tiny_pairs(&tmp.path().join("data"), 4);
    let long = json!({
        "prompt": "Tell me about the rivers and the hills of the old country. ".repeat(20),
        "chosen": "Green.",
        "rejected": "Grey and flat.",
    })
    .to_string();
    // Answers that part only past the limit are cut to the same tokens: nothing to learn.
    let story = "Once there was a river that ran past the hills of the old country. ".repeat(8);
    let same_cut = json!({
        "prompt": "Tell me a story.",
        "chosen": format!("{story}The end."),
        "rejected": format!("{story}And then nothing."),
    });
    // Answers that part early and are cut: kept, and named as truncated.
    let cut = json!({
        "prompt": "Tell me a story.",
        "chosen": format!("Yes. {story}"),
        "rejected": format!("No. {story}"),
    });
    let mut text = std::fs::read_to_string(data.join("train.jsonl")).unwrap();
    text.push_str(&format!("{long}\n{same_cut}\n{cut}\n"));
    std::fs::write(data.join("train.jsonl"), text).unwrap();
    let m = [
        "--method",
        "dpo",
        "--max-steps",
        "2",
        "--max-seq-length",
        "64",
    ];
    let o = train(&model, &data, &tmp.path().join("out"), &m);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("2 pair(s) have an answer with no token left within --max-seq-length 64")
            && err.contains("train.jsonl:5, ")
            && err.contains("train.jsonl:6), and are left out"),
        "{err}"
    );
    assert!(
        err.contains("1 pair(s) longer than --max-seq-length 64 were truncated (")
            && err.contains("train.jsonl:7)"),
        "{err}"
    );
    std::fs::write(data.join("train.jsonl"), format!("{long}\n{long}\n")).unwrap();
    let out = tmp.path().join("none");
    let o = train(&model, &data, &out, &m);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no training pair has both answers"), "{err}");
    assert!(!out.exists());
}

/// A DPO run's first step is an exact tie. `eval` on preference data says what its figures
/// are against: the "every reward is 0" note for DPO only (ORPO has no reference), a note
/// where --beta is not the adapter's run's, and --no-mask-prompt refused as train refuses it.
#[test]
fn preference_eval_notes_match_the_method_and_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&tmp.path().join("model"));
    let data = tiny_pairs(&tmp.path().join("data"), 4);
    let out = tmp.path().join("out");
    let o = train(
        &model,
        &data,
        &out,
        &["--method", "dpo", "--max-steps", "1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // At the first step the policy is the reference (B is zero), and the step scores it as
    // the reference pass does: a tie, to the bit (it was 100% or 0% accuracy on noise).
    let first = &metrics(&out.join("metrics.jsonl"), "train")[0];
    assert_eq!(
        first["loss"].as_f64(),
        Some(std::f64::consts::LN_2),
        "{first}"
    );
    assert_eq!(first["reward_margin"].as_f64(), Some(0.0), "{first}");
    assert_eq!(first["reward_accuracy"].as_f64(), Some(0.0), "{first}");
    let eval = |extra: &[&str]| {
        let o = cli()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let zero = "every reward is 0";
    let (code, err) = eval(&["--method", "dpo"]);
    assert!(code == Some(0) && err.contains(zero), "{err}");
    let (code, err) = eval(&["--method", "orpo"]);
    assert!(code == Some(0) && !err.contains(zero), "{err}");
    let adapter = out.to_str().unwrap();
    let (code, err) = eval(&["--method", "dpo", "--adapter", adapter]);
    assert!(code == Some(0) && !err.contains("--beta"), "{err}");
    let (code, err) = eval(&["--method", "dpo", "--adapter", adapter, "--beta", "0.5"]);
    assert!(
        code == Some(0) && err.contains("the adapter's run trained with --beta 0.1"),
        "{err}"
    );
    let (code, err) = eval(&["--method", "dpo", "--no-mask-prompt"]);
    assert!(
        code == Some(2) && err.contains("--no-mask-prompt with --method dpo"),
        "{err}"
    );
}
