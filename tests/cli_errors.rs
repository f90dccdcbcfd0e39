//! Bad input through the CLI: one clear message naming the problem, a non-zero exit, no panic.

mod common;

use candle_core::quantized::GgmlDType;
use common::{cli, smollm2, tiny_weights, write_gguf, write_hf_dir, TinySpec};
use predicates::prelude::*;
use std::path::Path;

/// Runs `your_ai <args>` and checks it failed cleanly with `needles` in its message.
fn fails_with(args: &[&str], extra: &[&Path], envs: &[(&str, &str)], needles: &[&str]) {
    let mut cmd = cli();
    cmd.args(args);
    for p in extra {
        cmd.arg(p);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: `{n}` not in: {stderr}");
    }
}

fn generate_args() -> Vec<&'static str> {
    vec!["generate", "--prompt", "hi", "--model"]
}

#[test]
fn missing_model_path() {
    fails_with(
        &[&generate_args()[..], &["./no/such/model.gguf"]].concat(),
        &[],
        &[],
        &["./no/such/model.gguf", "does not exist"],
    );
}

#[test]
fn directory_without_config_json() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(&generate_args(), &[dir.path()], &[], &["no config.json"]);
}

#[test]
fn truncated_safetensors() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(
        dir.path(),
        &spec,
        &tiny_weights(&spec, 1),
        candle_core::DType::F32,
    );
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &generate_args(),
        &[dir.path()],
        &[],
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.gguf");
    let bytes = std::fs::read(smollm2()).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&generate_args(), &[&path], &[], &["half.gguf", "truncated"]);
}

/// With RUST_BACKTRACE=1 (as many Rust users have it), a library error is still one sentence,
/// not the backtrace candle captured into it.
#[test]
fn an_error_is_one_sentence_even_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, "these are notes, not a model\n").unwrap();
    let o = cli()
        .args(generate_args())
        .arg(&path)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("notes.gguf") && stderr.contains("not a valid GGUF"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn gguf_of_an_unsupported_architecture() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    write_gguf(
        &path,
        &spec,
        &tiny_weights(&spec, 1),
        GgmlDType::F32,
        "gpt2",
    );
    fails_with(
        &generate_args(),
        &[&path],
        &[],
        &["unsupported architecture", "gpt2", "LlamaForCausalLM"],
    );
}

#[test]
fn unsupported_architecture_in_config_json() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(
        dir.path(),
        &spec,
        &tiny_weights(&spec, 1),
        candle_core::DType::F32,
    );
    let mut cfg = spec.config_json();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    fails_with(
        &generate_args(),
        &[dir.path()],
        &[],
        &["GPTNeoXForCausalLM", "MistralForCausalLM"],
    );
}

#[test]
fn unknown_alias_and_uncached_repo_offline() {
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let offline = [("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")];
    fails_with(
        &[&generate_args()[..], &["llama-9000"]].concat(),
        &[],
        &offline,
        &["unknown model `llama-9000`", "llama-8b"],
    );
    fails_with(
        &[&generate_args()[..], &["llama-8b"]].concat(),
        &[],
        &offline,
        &[
            "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated",
            "not in the local Hugging Face cache",
            home_s,
            "--model",
        ],
    );
}

#[test]
fn malformed_jsonl_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    fails_with(
        &["eval", "--data", data.to_str().unwrap(), "--model"],
        &[&smollm2()],
        &[],
        &["bad.jsonl:2", "not valid JSON"],
    );
}

/// Examples that parse but cannot be encoded are all named, as train names them (eval named
/// the first only).
#[test]
fn eval_names_every_example_it_cannot_encode() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tools.jsonl");
    let row = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
    std::fs::write(&data, format!("{row}\n{{\"text\": \"fine\"}}\n{row}\n")).unwrap();
    fails_with(
        &["eval", "--data", data.to_str().unwrap(), "--model"],
        &[&smollm2()],
        &[],
        &["tools.jsonl:1", "tools.jsonl:3", "`tools` is left out"],
    );
}

/// `eval --data DIR` reads the held-out file; the directory needs no train.jsonl.
#[test]
fn eval_of_a_directory_reads_its_held_out_file() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &["eval", "--data", dir.path().to_str().unwrap(), "--model"],
        &[&smollm2()],
        &[],
        &["no valid.jsonl, test.jsonl or train.jsonl"],
    );
    // Read, line by line, before the model loads: the bad line shows which file was chosen.
    let valid = dir.path().join("valid.jsonl");
    std::fs::write(&valid, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    fails_with(
        &["eval", "--data", dir.path().to_str().unwrap(), "--model"],
        &[&smollm2()],
        &[],
        &["valid.jsonl:2", "not valid JSON"],
    );
}

/// A negative value after a space is the flag's value, refused with its reason (not clap's
/// "unexpected argument '-0'").
#[test]
fn negative_values_are_refused_as_values() {
    for (flag, value) in [
        ("--lora-dropout", "-0.5"),
        ("--max-memory", "-5"),
        ("--weight-decay", "-1"),
        ("--max-grad-norm", "-1"),
        ("--lora-alpha", "-3"),
        ("--beta", "-1"),
        ("--learning-rate", "-0.5"),
    ] {
        let out = cli()
            .args(["train", "--model", "x", "--data", "y", flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: {err}"
        );
        assert!(
            !err.contains("unexpected argument"),
            "{flag} {value}: {err}"
        );
    }
}

/// Sizes past any machine are refused at once (a search through every smaller batch size hung,
/// and the estimate's products wrapped around), and `estimate` takes the model's context as
/// `train` does.
#[test]
fn huge_sizes_and_lengths_past_the_context_are_refused() {
    let m = smollm2();
    let m = m.to_str().unwrap();
    for (args, needle) in [
        (
            &["estimate", "--batch-size", "2199023255552"][..],
            "--batch-size 2199023255552: at most",
        ),
        (
            &["train", "--data", "y", "--batch-size", "100000000"][..],
            "at most 65536",
        ),
        (
            &["estimate", "--max-seq-length", "100000000"][..],
            "at most 1048576",
        ),
        (
            &["estimate", "--max-seq-length", "20000"][..],
            "the model's context is 8192",
        ),
    ] {
        let out = cli().args(args).args(["--model", m]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bad_flag_values() {
    let out = cli()
        .args(["eval", "--model", "x", "--data", "y", "--batch-size", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch-size"));
    // A floor above the learning rate would give a constant schedule without a word.
    let out = cli()
        .args(["train", "--model", "x", "--data", "y", "--min-lr", "1"])
        .args(["--learning-rate", "1e-3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--min-lr 1 is above --learning-rate"), "{e}");
    // Sampling values are checked by the tool, a negative one included, before the load.
    for (flags, needle) in [
        (
            ["--temperature", "-1"],
            "--temperature -1 must be 0 (greedy) or positive",
        ),
        (["--top-p", "-0.5"], "--top-p -0.5 is outside (0, 1]"),
        (
            ["--max-tokens", "0"],
            "--max-tokens 0: there would be nothing to generate",
        ),
        (["--prompt", " "], "--prompt is empty"),
        // A negative count is a bad value, not an unknown argument.
        (
            ["--max-tokens", "-1"],
            "invalid value '-1' for '--max-tokens",
        ),
    ] {
        let out = cli()
            .args(["generate", "--model", "x", "--prompt", "hi"])
            .args(flags)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {e}");
        assert!(e.contains(needle), "{flags:?}: {e}");
    }
}

#[test]
fn models_lists_aliases() {
    let home = tempfile::tempdir().unwrap();
    cli()
        .arg("models")
        .env("HF_HOME", home.path())
        .assert()
        .success()
        .stdout(
            predicate::str::contains("llama-8b").and(predicate::str::contains(
                "NousResearch/Hermes-3-Llama-3.1-70B",
            )),
        );
    // A snapshot of the config alone (an interrupted download) is no model; a broken ref or
    // a cache that is a file is said to be so.
    let repo = home
        .path()
        .join("hub/models--NousResearch--Hermes-3-Llama-3.1-70B");
    std::fs::create_dir_all(repo.join("snapshots/abc1")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc1").unwrap();
    std::fs::write(repo.join("snapshots/abc1/config.json"), "{}").unwrap();
    let listed = |env: (&str, &Path)| {
        let mut c = cli();
        c.arg("models").env_remove("HF_HUB_CACHE").env(env.0, env.1);
        let o = c.output().unwrap();
        assert!(o.status.success());
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (text(&o.stdout), text(&o.stderr))
    };
    let (out, _) = listed(("HF_HOME", home.path()));
    assert!(out.contains("config only (no weights)"), "{out}");
    std::fs::write(repo.join("refs/main"), "not a hash!").unwrap();
    let (out, _) = listed(("HF_HOME", home.path()));
    assert!(out.contains("broken: "), "{out}");
    let file = home.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (_, err) = listed(("HF_HUB_CACHE", &file));
    assert!(err.contains("is not a directory"), "{err}");
}

#[test]
fn bad_thread_count_and_memory_flags() {
    fails_with(&["--threads", "0", "models"], &[], &[], &["--threads 0"]);
    // Far past the cores, a run crawls or never ends.
    fails_with(
        &["--threads", "100000", "models"],
        &[],
        &[],
        &["--threads 100000: this machine runs"],
    );
    for bad in ["0", "1e30", "1e400", "abc"] {
        fails_with(
            &["recommend", "--memory", bad],
            &[],
            &[],
            &[&format!("'{bad}' for '--memory <GB>'"), "at most 1000000"],
        );
    }
    fails_with(
        &["estimate", "--model", "llama-8b", "--quantize", "3"],
        &[],
        &[],
        &["'3' for '--quantize", "give 4 or 8"],
    );
    fails_with(
        &["estimate", "--model", "llama-8b", "--num-layers", "40"],
        &[],
        &[],
        &["--num-layers 40: the model has 32 blocks"],
    );
    // As train checks them (estimate planned with them).
    for (flag, value) in [("--lora-dropout", "1.5"), ("--lora-alpha", "NaN")] {
        fails_with(
            &["estimate", "--model", "llama-8b", flag, value],
            &[],
            &[],
            &[&format!("{flag} ")],
        );
    }
    fails_with(
        &["benchmark", "--model", "llama-8b", "--batch-sizes", "1,x"],
        &[],
        &[],
        &["--batch-sizes 1,x"],
    );
}

/// A binary without the `mlx` feature asked for the MLX engine says how to build one.
#[cfg(not(feature = "mlx"))]
#[test]
fn engine_mlx_without_the_feature() {
    let r = common::tiny_run(4);
    let out = r
        .train_command(&r.root.join("out"))
        .args(["--engine", "mlx", "--max-steps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error: --engine mlx"), "{stderr}");
    assert!(stderr.contains("scripts/build_mlx.sh"), "{stderr}");
}

/// NVIDIA GPUs are the MLX engine's (candle's CUDA path is gone): `--device cuda` says how to
/// get the build that has it, from the candle engine (`generate`) and from `train` alike.
#[test]
fn device_cuda_names_the_mlx_cuda_build() {
    let model = smollm2();
    let model = model.to_str().unwrap();
    fails_with(
        &[
            "generate", "--prompt", "hi", "--device", "cuda", "--model", model,
        ],
        &[],
        &[],
        &["--device cuda", "scripts/build_mlx.sh --cuda"],
    );
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("run");
    fails_with(
        &[
            "train",
            "--model",
            model,
            "--data",
            "examples/invented-country",
            "--device",
            "cuda",
            "--max-steps",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
        &[],
        &["--device cuda", "build_mlx.sh --cuda"],
    );
    assert!(!out.join("adapters.safetensors").exists());
}

/// Output into a pipe the reader has closed (`your_ai models | head -1`) ends the command the
/// way Unix tools end, by SIGPIPE, not with a panic.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // Closed before the command starts: its first write finds no reader.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"))
        .arg("models")
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}

/// A damaged setup file: `recommend` refuses it and names `setup`, and `setup` repairs it
/// (the damaged one moved aside); with no place for the file, `setup` says so.
#[test]
fn setup_repairs_a_damaged_setup_file_and_needs_a_place_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    std::fs::write(tmp.path().join("setup.json"), "{").unwrap();
    let env = [("YOUR_AI_CONFIG_DIR", dir)];
    fails_with(&["recommend"], &[], &env, &["run `your_ai setup`"]);
    let o = cli().arg("setup").envs(env).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("setup.json.damaged"), "{e}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("setup.json.damaged")).unwrap(),
        "{"
    );
    assert!(cli()
        .arg("recommend")
        .envs(env)
        .output()
        .unwrap()
        .status
        .success());
    // Empty variables are unset ones, and with no home there is no place for the file (it
    // was written where the command ran).
    let o = cli()
        .arg("setup")
        .current_dir(tmp.path())
        .env("YOUR_AI_CONFIG_DIR", "")
        .env("XDG_CONFIG_HOME", "")
        .env_remove("HOME")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("HOME is not set"), "{e}");
    assert!(!tmp.path().join(".config").exists());
}

/// An adapter whose outputs are not finite (finite values that overflow the forward): `eval`
/// and `generate` fail, naming the cause, where they printed NaN or an empty reply with exit
/// 0; and a reply or a result that cannot be written (a full disk) is an error, not exit 0
/// (eval panicked).
#[test]
fn non_finite_outputs_and_unwritable_stdout_fail() {
    let r = common::tiny_run(4);
    let cfg = your_ai::model::ModelConfig::from_hf_file(&r.model.join("config.json")).unwrap();
    let adapter = r.root.join("huge");
    common::random_adapter(&cfg, &adapter, 1e30, 1);
    let valid = r.data.join("valid.jsonl");
    let eval = |adapter: &Path| {
        let mut c = cli();
        c.arg("eval")
            .arg("--model")
            .arg(&r.model)
            .arg("--data")
            .arg(&valid);
        c.arg("--adapter").arg(adapter);
        c
    };
    let generate = |adapter: &Path| {
        let mut c = cli();
        c.args(["generate", "--prompt", "hi", "--max-tokens", "3", "--model"])
            .arg(&r.model)
            .arg("--adapter")
            .arg(adapter);
        c
    };
    for (mut c, what) in [
        (eval(&adapter), "the loss is NaN"),
        (generate(&adapter), "scores are NaN or infinite"),
    ] {
        let o = c.output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(what) && !e.contains("panicked"), "{e}");
    }
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"))
        .arg("eval")
        .arg("--model")
        .arg(&r.model)
        .arg("--data")
        .arg(&valid)
        .stdout(full)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("cannot write standard output") && !e.contains("panicked"),
        "{e}"
    );
}

/// The exit status says whose mistake it is: 2 for the command line (a path or model name a
/// flag gives that is not there), 1 for a file that is there but damaged.
#[test]
fn exit_codes_tell_a_missing_path_from_a_damaged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = your_ai::weights::GgufFile::open(&smollm2())
        .unwrap()
        .config()
        .unwrap();
    let damaged = tmp.path().join("damaged");
    common::random_adapter(&cfg, &damaged, 0.1, 1);
    std::fs::write(damaged.join("adapter_config.json"), "{\"r\": 4,").unwrap();
    let model = smollm2();
    let model = model.to_str().unwrap();
    let out = tmp.path().join("a.gguf");
    let out = out.to_str().unwrap();
    let damaged = damaged.to_str().unwrap();
    for (args, code) in [
        (
            vec!["generate", "--prompt", "hi", "--model", "./no/such.gguf"],
            2,
        ),
        (
            vec!["generate", "--prompt", "hi", "--model", "no-such-alias"],
            2,
        ),
        (
            vec![
                "generate",
                "--prompt",
                "hi",
                "--model",
                model,
                "--adapter",
                "./no/such",
            ],
            2,
        ),
        (
            vec![
                "generate",
                "--prompt",
                "hi",
                "--model",
                model,
                "--adapter",
                damaged,
            ],
            1,
        ),
        (
            vec!["export-adapter", "--adapter", damaged, "--output", out],
            1,
        ),
    ] {
        let o = cli().args(&args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {e}");
        let last = e.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && !e.contains("panicked"),
            "{e}"
        );
    }
}

/// A model's own template that fails is named as that model's, with the way round it.
#[test]
fn a_failing_template_is_named_as_the_model_s() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&tmp.path().join("model"));
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "chat_template": "{{ raise_exception('only system turns') }}"})
        .to_string(),
    )
    .unwrap();
    let name = model.display().to_string();
    fails_with(
        &generate_args(),
        &[&model],
        &[],
        &[
            &format!("{name}'s chat template: the chat template raised an error"),
            "only system turns",
            "--raw sends the prompt as plain text",
        ],
    );
    // As plain text it runs.
    let o = cli()
        .args([
            "generate",
            "--raw",
            "--max-tokens",
            "2",
            "--prompt",
            "hi",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
