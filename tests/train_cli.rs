//! `your_ai train` as a user runs it: each flag's effect, bad input, determinism, the PEFT
//! layout, on a tiny model with SmolLM2's real tokenizer and template.

mod common;

use assert_cmd::prelude::*;
use common::{cli, metrics};
use std::path::{Path, PathBuf};

type Setup = common::TinyRun;

fn setup(n_train: usize) -> Setup {
    common::tiny_run(n_train)
}

/// Runs `your_ai train` on the setup with `base` then `extra` flags; returns (stderr, output dir).
fn run_train(s: &Setup, name: &str, base: &[&str], extra: &[&str]) -> (String, PathBuf) {
    let out = s.root.join(name);
    let o = s
        .train_command(&out)
        .args(base)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "train {extra:?} failed: {stderr}");
    (stderr, out)
}

/// A short training: 3 steps of batch 2, rank 4.
fn train(s: &Setup, name: &str, extra: &[&str]) -> (String, PathBuf) {
    let base = [
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-3",
        "--warmup-steps",
        "1",
    ];
    run_train(s, name, &base, extra)
}

/// A training whose length the extra flags decide.
fn train_no_steps(s: &Setup, name: &str, extra: &[&str]) -> (String, PathBuf) {
    run_train(s, name, &["--lora-rank", "4", "--warmup-steps", "1"], extra)
}

fn adapter_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

fn tensor_names(dir: &Path) -> Vec<String> {
    let t = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    names
}

#[test]
fn a_run_writes_adapter_metrics_and_summary() {
    let s = setup(8);
    let (stderr, out) = train(
        &s,
        "run",
        &[
            "--steps-per-eval",
            "2",
            "--save-every",
            "2",
            "--test",
            "--memory-report-interval",
            "1",
            "--profile",
        ],
    );
    for needle in [
        "Training finished: 3 steps",
        "trained tokens/s over 3 step(s) (step time only)",
        "peak memory",
        "validation loss",
        "test loss",
        "memory",
        "3/3",
        "Time by phase",
        "backward (blocks)",
    ] {
        assert!(stderr.contains(needle), "`{needle}` missing in:\n{stderr}");
    }
    // Every block keeps its activations here: no recompute ran, and no row claims one.
    assert!(stderr.contains("keep theirs"), "{stderr}");
    assert!(!stderr.contains("recompute (blocks)"), "{stderr}");
    let m = out.join("metrics.jsonl");
    let train_lines = metrics(&m, "train");
    assert_eq!(train_lines.len(), 3);
    for (i, l) in train_lines.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
        for key in [
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "trained_tokens",
            "step_time_s",
            "tokens_per_s",
            "rss_bytes",
        ] {
            assert!(!l[key].is_null(), "{key} missing in {l}");
        }
    }
    // Evaluation at step 0, every 2 steps and at the end; test at the end.
    let evals: Vec<u64> = metrics(&m, "eval")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 2, 3]);
    assert_eq!(metrics(&m, "test").len(), 1);
    assert!(out
        .join("checkpoints/step-2/adapter_model.safetensors")
        .is_file());
    assert!(out.join("best/adapter_model.safetensors").is_file());
    // Memory lines from --memory-report-interval 1.
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains(": resident memory ") && l.contains(" GB, peak "))
            .count(),
        3,
        "{stderr}"
    );
}

#[test]
fn peft_layout_names_shapes_and_config() {
    let s = setup(4);
    let (_, out) = train(
        &s,
        "peft",
        &[
            "--num-layers",
            "1",
            "--lora-targets",
            "q,v,down",
            "--lora-alpha",
            "8",
        ],
    );
    let c = adapter_config(&out);
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"], 8.0);
    assert_eq!(
        c["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(c["layers_to_transform"], serde_json::json!([1]));
    assert!(c["base_model_name_or_path"]
        .as_str()
        .unwrap()
        .ends_with("model"));
    let t = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let p = "base_model.model.model.layers.1";
    let expect = [
        (format!("{p}.self_attn.q_proj.lora_A.weight"), vec![4, 64]),
        (format!("{p}.self_attn.q_proj.lora_B.weight"), vec![64, 4]),
        (format!("{p}.self_attn.v_proj.lora_A.weight"), vec![4, 64]),
        (format!("{p}.self_attn.v_proj.lora_B.weight"), vec![32, 4]),
        (format!("{p}.mlp.down_proj.lora_A.weight"), vec![4, 96]),
        (format!("{p}.mlp.down_proj.lora_B.weight"), vec![64, 4]),
    ];
    assert_eq!(t.len(), expect.len());
    for (name, shape) in expect {
        let x = t.get(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(x.dims(), shape.as_slice(), "{name}");
        assert_eq!(x.dtype(), candle_core::DType::F32);
    }
    // What we write, we read back: eval and generate apply it.
    cli()
        .args(["eval", "--model"])
        .arg(&s.model)
        .arg("--data")
        .arg(&s.data)
        .arg("--adapter")
        .arg(&out)
        .assert()
        .success();
    cli()
        .args(["generate", "--max-tokens", "3", "--prompt", "hi", "--model"])
        .arg(&s.model)
        .arg("--adapter")
        .arg(&out)
        .assert()
        .success();
}

#[test]
fn same_seed_same_run_and_the_seed_matters() {
    let s = setup(8);
    let (_, a) = train(&s, "a", &["--seed", "7"]);
    let (_, b) = train(&s, "b", &["--seed", "7"]);
    let (_, c) = train(&s, "c", &["--seed", "8"]);
    let losses = |d: &Path| {
        metrics(&d.join("metrics.jsonl"), "train")
            .iter()
            .map(|l| l["loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&a), losses(&b));
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));
    // Keeping activations instead of recomputing them changes memory, not results.
    // (A count above the adapted blocks keeps them all, and says so.)
    let (stderr, d) = train(&s, "d", &["--seed", "7", "--keep-activations", "5"]);
    assert!(
        stderr.contains("2 of 2 adapted blocks keep theirs")
            && stderr.contains("note: --keep-activations 5: the run adapts 2 blocks"),
        "{stderr}"
    );
    assert_eq!(losses(&a), losses(&d));
    assert_eq!(bytes(&a), bytes(&d));
}

#[test]
fn schedule_clipping_and_accumulation_flags_act() {
    let s = setup(8);
    let lrs = |d: &Path| {
        metrics(&d.join("metrics.jsonl"), "train")
            .iter()
            .map(|l| l["lr"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let (_, constant) = train(
        &s,
        "const",
        &["--lr-schedule", "constant", "--warmup-steps", "0"],
    );
    assert_eq!(lrs(&constant), vec![1e-3; 3]);
    let (_, linear) = train(
        &s,
        "lin",
        &[
            "--lr-schedule",
            "linear",
            "--warmup-steps",
            "0",
            "--min-lr",
            "1e-4",
        ],
    );
    // 1e-3 down toward 1e-4 over 3 steps: the last a quarter above the floor, none at it.
    assert!(
        (lrs(&linear)[2] - 3.25e-4).abs() < 1e-12,
        "{:?}",
        lrs(&linear)
    );
    // Warmup is capped at the run's steps.
    let (stderr, _) = train(&s, "warm", &["--warmup-steps", "100"]);
    assert!(stderr.contains("capped"), "{stderr}");
    // Accumulation of 2 sees twice the tokens per step.
    let tok = |d: &Path| {
        metrics(&d.join("metrics.jsonl"), "train")[0]["tokens"]
            .as_u64()
            .unwrap()
    };
    let (_, acc) = train(&s, "acc", &["--grad-accumulation-steps", "2"]);
    let (_, one) = train(&s, "one", &[]);
    assert!(tok(&acc) > tok(&one));
    // More micro-batches a step than an epoch has: said, as a step then repeats examples.
    let (stderr, _) = train(&s, "acc-many", &["--grad-accumulation-steps", "9"]);
    assert!(stderr.contains("is more than an epoch's"), "{stderr}");
    // Epochs decide the number of steps: 8 examples / batch 2 = 4 steps per epoch.
    let (stderr, ep) = train_no_steps(&s, "ep", &["--epochs", "1.5", "--batch-size", "2"]);
    assert!(stderr.contains("Training finished: 6 steps"), "{stderr}");
    assert_eq!(metrics(&ep.join("metrics.jsonl"), "train").len(), 6);
    // Clipping: the logged norm is the pre-clip norm; a tiny max norm changes the update.
    let (_, clip) = train(
        &s,
        "clip",
        &[
            "--max-grad-norm",
            "1e-6",
            "--lr-schedule",
            "constant",
            "--warmup-steps",
            "0",
        ],
    );
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_ne!(bytes(&clip), bytes(&constant));
}

#[test]
fn masking_packing_and_metrics_file_flags_act() {
    let s = setup(8);
    let share = |stderr: &str| -> f64 {
        let i = stderr.find("training tokens trained (").unwrap();
        stderr[i + 25..].split('%').next().unwrap().parse().unwrap()
    };
    let (masked, _) = train(&s, "masked", &[]);
    let (all, _) = train(&s, "all", &["--no-mask-prompt"]);
    // Unmasked: every token but each example's first, which nothing predicts.
    assert!(
        share(&masked) < 60.0 && share(&all) > 95.0,
        "{} {}",
        share(&masked),
        share(&all)
    );
    // Packing puts several examples in a row: fewer rows, more tokens per step.
    let tok = |d: &Path| {
        metrics(&d.join("metrics.jsonl"), "train")[0]["tokens"]
            .as_u64()
            .unwrap()
    };
    let (_, packed) = train(&s, "packed", &["--pack", "--max-seq-length", "256"]);
    let (_, plain) = train(&s, "plain", &[]);
    assert!(tok(&packed) > 2 * tok(&plain));
    let custom = s.root.join("elsewhere/m.jsonl");
    let (_, out) = train(
        &s,
        "mf",
        &["--metrics-file", custom.to_str().unwrap(), "--no-save-best"],
    );
    assert_eq!(metrics(&custom, "train").len(), 3);
    assert!(!out.join("metrics.jsonl").exists());
    assert!(!out.join("best").exists());
}

#[test]
fn yaml_config_supplies_flags_and_the_command_line_wins() {
    let s = setup(8);
    let yaml = s.root.join("run.yaml");
    std::fs::write(
        &yaml,
        "max_steps: 2\nlora-rank: 8\nlora_targets: [q, v]\nsave_best: false\n",
    )
    .unwrap();
    let out = s.root.join("yaml");
    s.train_command(&out)
        .arg("--config")
        .arg(&yaml)
        .args(["--lora-rank", "2", "--batch-size", "2"])
        .assert()
        .success();
    assert_eq!(metrics(&out.join("metrics.jsonl"), "train").len(), 2);
    let c = adapter_config(&out);
    assert_eq!(c["r"], 2);
    assert_eq!(c["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert!(!out.join("best").exists());
    assert!(tensor_names(&out)
        .iter()
        .all(|n| n.contains("q_proj") || n.contains("v_proj")));
    std::fs::write(&yaml, "lora_rnak: 8\n").unwrap();
    let o = cli()
        .args(["train", "--model", "x", "--config"])
        .arg(&yaml)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("`lora-rnak` is not a train flag"));

    // A run of the file `text` into `out`, with `extra` flags.
    let run = |text: &str, out: &Path, extra: &[&str]| {
        std::fs::write(&yaml, text).unwrap();
        let o = s
            .train_command(out)
            .arg("--config")
            .arg(&yaml)
            .args(["--batch-size", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // The command line's --max-steps wins over the file's `epochs`, which it conflicts with.
    let out = s.root.join("epochs");
    let e = run("epochs: 1\n", &out, &["--max-steps", "2"]);
    assert!(e.contains("`epochs` is not used"), "{e}");
    assert_eq!(metrics(&out.join("metrics.jsonl"), "train").len(), 2);
    // `resume: true` is the bare --resume: here, with no checkpoint yet, a run from the start.
    let out = s.root.join("resumed");
    let e = run("resume: true\nmax_steps: 2\n", &out, &[]);
    assert!(e.contains("has no checkpoint yet"), "{e}");
    assert_eq!(metrics(&out.join("metrics.jsonl"), "train").len(), 2);
    // The command line's --force holds with a file (it was lost): the run is replaced.
    run("max_steps: 1\n", &out, &["--force"]);
    assert_eq!(metrics(&out.join("metrics.jsonl"), "train").len(), 1);
    // Refused before anything loads: two conflicting keys, one setting given twice, a bad
    // value even where the command line overrides it.
    for (text, extra, says) in [
        ("epochs: 1\nmax_steps: 3\n", &[][..], "cannot both be given"),
        (
            "lora_rank: 4\nlora-rank: 8\n",
            &[],
            "`lora-rank` and `lora_rank` both set `lora-rank`",
        ),
        ("resume: true\n", &["--force"], "--resume continues the run"),
        (
            "mask_prompt: true\nno_mask_prompt: true\n",
            &[],
            "both set `mask-prompt`",
        ),
        (
            "lora_rank: many\n",
            &["--lora-rank", "4"],
            "`lora-rank`: invalid type",
        ),
        // A hidden flag, for tests, is no setting: it was silently dropped.
        (
            "test_memory_limit: 1@1\n",
            &[],
            "`test-memory-limit` is not a train flag",
        ),
    ] {
        std::fs::write(&yaml, text).unwrap();
        let o = cli()
            .args(["train", "--model", "x", "--config"])
            .arg(&yaml)
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{text}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(says), "{text}: {e}");
    }
}

/// Bad input: a clear message, a non-zero exit and no output directory.
#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let s = setup(4);
    let bad = s.root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let write = |name: &str, content: &str| {
        let p = bad.join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let chat = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--data".into(), s.root.join("nope").display().to_string()],
            "does not exist",
        ),
        (
            vec![
                "--data".into(),
                write("empty.jsonl", "").display().to_string(),
            ],
            "holds no examples",
        ),
        (
            vec![
                "--data".into(),
                write("notjson.jsonl", &format!("{chat}\n{{oops\n"))
                    .display()
                    .to_string(),
            ],
            "notjson.jsonl:2: not valid JSON",
        ),
        (
            vec![
                "--data".into(),
                write(
                    "noasst.jsonl",
                    "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n",
                )
                .display()
                .to_string(),
            ],
            "noasst.jsonl:1: the conversation has no assistant turn",
        ),
        (
            vec![
                "--data".into(),
                write("keys.jsonl", "{\"question\": \"a\"}\n")
                    .display()
                    .to_string(),
            ],
            "keys.jsonl:1: unknown format",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--max-seq-length".into(),
                "12".into(),
            ],
            "no token of the training data is trained",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--lora-rank".into(),
                "0".into(),
            ],
            "--lora-rank 0",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--batch-size".into(),
                "9".into(),
            ],
            "--batch-size 9 is larger than the training set (4 examples)",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--max-memory".into(),
                "100000".into(),
            ],
            "--max-memory 100000: this device has only",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--max-memory".into(),
                "0".into(),
            ],
            "'0' for '--max-memory <GB>': give the size in GB as a positive number",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--max-seq-length".into(),
                "1000000".into(),
            ],
            "the model's context is",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--quantize".into(),
                "3".into(),
            ],
            "'3' for '--quantize <BITS>': give 4 or 8",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--lora-targets".into(),
                "q,zz".into(),
            ],
            "`zz` is not one of",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--num-layers".into(),
                "5".into(),
            ],
            "--num-layers 5: the model has only 2 blocks",
        ),
        (
            vec![
                "--data".into(),
                s.data.join("train.jsonl").display().to_string(),
                "--save-best".into(),
            ],
            "--save-best keeps the adapter with the best validation loss, and",
        ),
        (
            vec![
                "--data".into(),
                s.data.display().to_string(),
                "--memory-report-interval".into(),
                "0".into(),
            ],
            "--memory-report-interval 0: give a number of steps",
        ),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let out = s.root.join(format!("out{i}"));
        let o = cli()
            .arg("train")
            .arg("--model")
            .arg(&s.model)
            .arg("--output")
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            stderr.lines().any(|l| l.starts_with("error: ")) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in {stderr}"
        );
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

#[test]
fn default_output_is_models_name_lora() {
    let s = setup(4);
    let cwd = s.root.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    cli()
        .current_dir(&cwd)
        .arg("train")
        .arg("--model")
        .arg(&s.model)
        .arg("--data")
        .arg(&s.data)
        .args(["--max-steps", "1", "--batch-size", "2", "--lora-rank", "2"])
        .assert()
        .success();
    assert!(cwd
        .join("models/model-lora/adapter_model.safetensors")
        .is_file());
    assert!(cwd.join("models/model-lora/metrics.jsonl").is_file());
}

/// Truncated examples are named, as the ones left out are, so that they can be found.
#[test]
fn truncated_examples_are_named() {
    let s = setup(4);
    let train_file = s.data.join("train.jsonl");
    let long = serde_json::json!({"messages": [{"role": "user", "content": "Say it."},
        {"role": "assistant", "content": "blue and green ".repeat(40)}]});
    let mut text = std::fs::read_to_string(&train_file).unwrap();
    text.push_str(&format!("{long}\n"));
    std::fs::write(&train_file, text).unwrap();
    let (stderr, _) = train(&s, "cut", &["--max-seq-length", "48"]);
    // The training file's long one, and the validation file's (longer than the other
    // training examples).
    assert!(
        stderr.contains("example(s) longer than --max-seq-length 48 were truncated (")
            && stderr.contains("train.jsonl:5, ")
            && stderr.contains("valid.jsonl:1")
            && !stderr.contains("train.jsonl:1"),
        "{stderr}"
    );
}
