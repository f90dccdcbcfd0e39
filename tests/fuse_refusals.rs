//! `fuse` and `export-adapter` refusals, as a user meets them: bad input, an overflowing
//! adapter, a stop mid-write, each leaving nothing behind; and the dtype `--hf-dtype auto`
//! picks.

mod common;
#[path = "common/fuse.rs"]
mod fuse_cli;

use common::*;
use fuse_cli::*;

#[test]
fn bad_input_is_refused_with_nothing_left_behind() {
    let run = tiny_run(2);
    let adapter = run.root.join("adapter");
    random_adapter(&hf_config(&run.model), &adapter, 0.1, 1);
    let out_dir = run.root.join("outs");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("m");
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    // Missing adapter_config.json.
    let empty = run.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = err(fuse(&run.model, &empty, &out, &[]));
    assert!(
        e.contains("adapter_config.json") && e.contains("--adapter"),
        "{e}"
    );

    // An adapter of another model's shape (SmolLM2's tiny cousin has hidden 64, SmolLM2 576).
    let e = err(fuse(&smollm2(), &adapter, &out, &["--dequantize"]));
    assert!(e.contains("made for another model"), "{e}");

    // Unknown --gguf-type: named, with the accepted values.
    let e = err(fuse(&run.model, &adapter, &out, &["--gguf-type", "q3_k"]));
    assert!(e.contains("q3_k") && e.contains("q4_k_m"), "{e}");
    assert_only(&out_dir, &[]);

    // An existing output is refused unless --force, and replaced whole with it.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("old.txt"), "x").unwrap();
    let e = err(fuse(&run.model, &adapter, &out, &[]));
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert!(out.join("old.txt").is_file());
    fuse_ok(&run.model, &adapter, &out, &["--force"]);
    assert!(!out.join("old.txt").exists() && out.join("model.safetensors").is_file());
    assert_only(&out_dir, &["m"]);

    // --force never replaces an input, nor a directory with a GGUF file: refused before work.
    let e = err(fuse(&run.model, &adapter, &adapter, &["--force"]));
    assert!(e.contains("is --adapter"), "{e}");
    let e = err(fuse(&run.model, &adapter, &run.root, &["--force"]));
    assert!(e.contains("holds --adapter"), "{e}");
    let weights = adapter.join("adapter_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let e = err(fuse(
        &run.model,
        &adapter,
        &weights,
        &["--force", "--format", "gguf"],
    ));
    assert!(e.contains("is inside --adapter"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    let e = err(fuse(
        &run.model,
        &adapter,
        &out,
        &["--force", "--format", "gguf"],
    ));
    assert!(
        e.contains("is a directory, and this output is a file"),
        "{e}"
    );
    // A failed fuse takes back the folders it made; a killed one's leftover goes at the next.
    let e = err(fuse(
        &smollm2(),
        &adapter,
        &out_dir.join("new/m"),
        &["--dequantize"],
    ));
    assert!(e.contains("made for another model"), "{e}");
    std::fs::write(
        out_dir.join(".m.partial-999999999"),
        "left by a killed fuse",
    )
    .unwrap();
    fuse_ok(&run.model, &adapter, &out, &["--force"]);
    assert_only(&out_dir, &["m"]);

    // A scale (lora_alpha / r) that overflows the merge: refused, never written as infinities.
    let huge = run.root.join("huge");
    std::fs::create_dir_all(&huge).unwrap();
    std::fs::copy(&weights, huge.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["lora_alpha"] = serde_json::json!(3e38);
    std::fs::write(huge.join("adapter_config.json"), cfg.to_string()).unwrap();
    let e = err(fuse(&run.model, &huge, &out_dir.join("h"), &[]));
    assert!(e.contains("the result overflows"), "{e}");
    assert_only(&out_dir, &["m"]);
    // Nor written as an adapter llama.cpp would apply as infinities.
    let o = cli()
        .args(["export-adapter", "--adapter"])
        .arg(&huge)
        .arg("--model")
        .arg(&run.model)
        .arg("--output")
        .arg(out_dir.join("h.gguf"))
        .output()
        .unwrap();
    let code = o.status.code();
    let e = err(o);
    assert!(code == Some(2) && e.contains("overflows"), "{code:?}: {e}");
    assert_only(&out_dir, &["m"]);

    // export-adapter: a missing config and an existing output.
    let g = out_dir.join("a.gguf");
    let e = err(cli()
        .args(["export-adapter", "--adapter"])
        .arg(&empty)
        .arg("--output")
        .arg(&g)
        .output()
        .unwrap());
    assert!(e.contains("adapter_config.json"), "{e}");
    std::fs::write(&g, "x").unwrap();
    let e = err(cli()
        .args(["export-adapter", "--adapter"])
        .arg(&adapter)
        .arg("--model")
        .arg(&run.model)
        .arg("--output")
        .arg(&g)
        .output()
        .unwrap());
    assert!(e.contains("already exists"), "{e}");
    assert_only(&out_dir, &["m", "a.gguf"]);
}

/// Ctrl-C during a fuse stops it between tensors: exit 130, and neither the partial output
/// (as large as the model) nor the folders made for it are left behind.
#[test]
fn a_stopped_fuse_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = smollm2_adapter(&tmp.path().join("adapter"));
    let outs = tmp.path().join("outs");
    let out = outs.join("deep").join("merged.gguf");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"))
        .args(["fuse", "--model"])
        .arg(smollm2())
        .arg("--adapter")
        .arg(&adapter)
        .arg("--output")
        .arg(&out)
        .args(["--dequantize", "--gguf-type", "q8_0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = outs
        .join("deep")
        .join(format!(".merged.gguf.partial-{}", child.id()));
    let started = std::time::Instant::now();
    while !partial.exists() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the fuse never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
    assert_eq!(status.code(), Some(130), "{e}");
    assert!(e.contains("stopping: the partial output is removed"), "{e}");
    assert!(
        !outs.exists(),
        "left behind: {:?}",
        std::fs::read_dir(&outs).ok()
    );
}

/// `--hf-dtype auto` keeps a Hugging Face base's dtype: its config's `torch_dtype`, or where
/// the config names none, its weights' (an f16 checkpoint came out bf16, losing precision).
#[test]
fn hf_dtype_auto_keeps_the_checkpoints_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let model = tmp.path().join("f16");
    write_hf_dir(
        &model,
        &spec,
        &tiny_weights(&spec, 3),
        candle_core::DType::F16,
    );
    // Its config names no dtype (the tiny model's says float32).
    let path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("torch_dtype");
    std::fs::write(&path, config.to_string()).unwrap();
    let adapter = tmp.path().join("adapter");
    random_adapter(&hf_config(&model), &adapter, 0.1, 1);
    let report = fuse_ok(&model, &adapter, &tmp.path().join("out"), &[]);
    assert!(report.contains("Hugging Face directory, f16"), "{report}");
}
