//! `fuse` and `export-adapter`: merged models evaluate like base + adapter, in every output
//! format; GGUF files we write read back in llama.cpp's layout; bad input leaves nothing behind.

mod common;
#[path = "common/fuse.rs"]
mod fuse_cli;

use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::{Device, Tensor};
use common::*;
use fuse_cli::*;
use std::path::Path;
use your_ai::model::lora::Target;
use your_ai::weights::gguf::permute_qk;
use your_ai::weights::GgufFile;

#[test]
fn tiny_hf_base_fuses_to_hf_and_gguf_with_the_adapters_loss() {
    let run = tiny_run(4);
    let adapter = run.root.join("adapter");
    random_adapter(&hf_config(&run.model), &adapter, 0.3, 1);
    let base = eval_loss(&run.model, &run.data, None);
    let with = eval_loss(&run.model, &run.data, Some(&adapter));
    assert!(
        (base - with).abs() > 0.01,
        "adapter changes little: {base} vs {with}"
    );
    let out = run.root.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // Hugging Face, f32: the same loss, and the --data report prints both.
    let hf = out.join("hf");
    let report = fuse_ok(
        &run.model,
        &adapter,
        &hf,
        &["--hf-dtype", "f32", "--data", run.data.to_str().unwrap()],
    );
    assert!(
        report.contains("base + adapter")
            && report.contains("merged")
            && report.contains("(Hugging Face directory, f32)"),
        "{report}"
    );
    let fused = eval_loss(&hf, &run.data, None);
    assert!((fused - with).abs() < 1e-4, "hf f32: {fused} vs {with}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }

    // Sharded: an index naming every tensor, same loss.
    let sharded = out.join("sharded");
    fuse_ok(
        &run.model,
        &adapter,
        &sharded,
        &["--hf-dtype", "f32", "--max-shard-size", "100000"],
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() >= 3, "{shards:?}");
    assert!(shards.iter().all(|s| sharded.join(s).is_file()));
    assert!(!sharded.join("model.safetensors").exists());
    assert!((eval_loss(&sharded, &run.data, None) - with).abs() < 1e-4);

    // GGUF in each type, read back by our loader (tokenizer rebuilt from the GGUF metadata).
    let mut losses = vec![];
    // Relative bounds: this random model's loss is ~22 nats, its logits large.
    for (ty, rel) in [
        ("f32", 1e-5),
        ("f16", 2e-4),
        ("bf16", 2e-3),
        ("q8_0", 5e-3),
        ("q4_0", 5e-2),
        ("q4_k_m", 5e-2),
    ] {
        let tol = rel * with;
        let path = out.join(format!("m-{ty}.gguf"));
        let report = fuse_ok(&run.model, &adapter, &path, &["--gguf-type", ty]);
        // The summary names the type as the flag spells it.
        assert!(report.contains(&format!("(GGUF, {ty})")), "{report}");
        let l = eval_loss(&path, &run.data, None);
        losses.push((ty, l - with));
        assert!((l - with).abs() < tol, "gguf {ty}: {l} vs {with}");
    }
    eprintln!("gguf loss differences from base + adapter: {losses:?}");
    let g = GgufFile::open(&out.join("m-f16.gguf")).unwrap();
    assert_eq!(g.architecture(), "llama");
    assert_eq!(g.meta_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(g.meta_str("tokenizer.ggml.pre"), Some("smollm"));
    assert!(g
        .meta_str("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));
    let (gc, hc) = (g.config().unwrap(), hf_config(&run.model));
    assert_eq!(
        (
            gc.hidden_size,
            gc.intermediate_size,
            gc.num_hidden_layers,
            gc.num_attention_heads
        ),
        (
            hc.hidden_size,
            hc.intermediate_size,
            hc.num_hidden_layers,
            hc.num_attention_heads
        )
    );
    assert_eq!(
        (gc.num_key_value_heads, gc.head_dim, gc.vocab_size),
        (hc.num_key_value_heads, hc.head_dim, hc.vocab_size)
    );
    assert_eq!(
        (gc.tie_word_embeddings, gc.bos_token_id),
        (hc.tie_word_embeddings, hc.bos_token_id)
    );
    assert!((gc.rms_norm_eps - hc.rms_norm_eps).abs() < 1e-9);
    // Llama 3 scaling written as llama.cpp's per-frequency divisors, checked against the
    // test helper's own computation of them.
    let want = rope_freq_factors(&TinySpec {
        vocab: 49152,
        tied: true,
        ..Default::default()
    });
    match gc.rope_scaling {
        Some(your_ai::model::config::RopeScaling::Factors(f)) => {
            assert!(
                f.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
                "{f:?} vs {want:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_only(
        &out,
        &[
            "hf",
            "sharded",
            "m-f32.gguf",
            "m-f16.gguf",
            "m-bf16.gguf",
            "m-q8_0.gguf",
            "m-q4_0.gguf",
            "m-q4_k_m.gguf",
        ],
    );
}

/// Raw tensor `name` of a GGUF file, as stored (q/k rows in llama.cpp's order).
fn raw(path: &Path, name: &str) -> Tensor {
    let g = GgufFile::open(path).unwrap();
    g.qtensor(name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn gguf_base_merges_in_llama_cpp_layout_and_adapter_gguf_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default(); // llama3 RoPE scaling, carried as rope_freqs
    let base = tmp.path().join("base.gguf");
    write_gguf(
        &base,
        &spec,
        &tiny_weights(&spec, 3),
        candle_core::quantized::GgmlDType::F32,
        "llama",
    );
    let cfg = GgufFile::open(&base).unwrap().config().unwrap();
    let adapter_dir = tmp.path().join("adapter");
    let adapter = random_adapter(&cfg, &adapter_dir, 0.2, 2);
    let scale = adapter.cfg.scale();

    let fused = tmp.path().join("fused.gguf");
    fuse_ok(&base, &adapter_dir, &fused, &["--gguf-type", "f32"]);
    // Independent check in the stored layout: out = base + scale · P(B) · A for q and k, where P
    // is llama.cpp's row permutation (the test writer applies it as llama.cpp's converter does).
    for (t, heads, gname) in [
        (Target::Q, spec.heads, "attn_q"),
        (Target::K, spec.kv_heads, "attn_k"),
        (Target::Up, 0, "ffn_up"),
    ] {
        for l in 0..spec.layers {
            let p = adapter.get(l, t).unwrap();
            let mut b = p.b.clone();
            if heads > 0 {
                b = permute_qk(&b, heads).unwrap();
            }
            let want = (raw(&base, &format!("blk.{l}.{gname}.weight"))
                + (b.matmul(&p.a).unwrap() * scale).unwrap())
            .unwrap();
            let got = raw(&fused, &format!("blk.{l}.{gname}.weight"));
            assert!(max_diff(&want, &got) < 1e-5, "{gname} {l}");
        }
    }
    assert!(
        max_diff(
            &raw(&base, "rope_freqs.weight"),
            &raw(&fused, "rope_freqs.weight")
        ) < 1e-6
    );
    let back = GgufFile::open(&fused).unwrap().config().unwrap();
    assert_eq!(back, cfg);

    // The adapter GGUF: lora_b of q/k permuted like the weight, so base + scale·lora_b·lora_a
    // (how llama.cpp applies it) equals the fused tensor as stored.
    let agguf = tmp.path().join("adapter.gguf");
    let o = cli()
        .args(["export-adapter", "--adapter"])
        .arg(&adapter_dir)
        .arg("--model")
        .arg(&base)
        .arg("--output")
        .arg(&agguf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = GgufFile::open(&agguf).unwrap();
    assert_eq!(g.meta_str("general.type"), Some("adapter"));
    assert_eq!(g.meta_str("adapter.type"), Some("lora"));
    // Given as a model, it is named for what it is.
    let o = cli()
        .args(["estimate", "--model"])
        .arg(&agguf)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("is a LoRA adapter"),
        "{e}"
    );
    let alpha = match g.metadata("adapter.lora.alpha") {
        Some(GValue::F32(a)) => *a as f64,
        v => panic!("{v:?}"),
    };
    for l in 0..spec.layers {
        for gname in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            let w = format!("blk.{l}.{gname}.weight");
            let a = raw(&agguf, &format!("{w}.lora_a"));
            let b = raw(&agguf, &format!("{w}.lora_b"));
            let rank = a.dim(0).unwrap() as f64;
            let want =
                (raw(&base, &w) + (b.matmul(&a).unwrap() * (alpha / rank)).unwrap()).unwrap();
            assert!(max_diff(&want, &raw(&fused, &w)) < 1e-5, "{w}");
            // llama.cpp's shape rule: a is [r, in] and b is [out, r] (ne reversed in the file).
            let wd = raw(&base, &w).dims().to_vec();
            assert_eq!((a.dims()[1], b.dims()[0]), (wd[1], wd[0]));
        }
    }
    // Read back through our loader: the same pairs as the PEFT adapter.
    let read = your_ai::export::adapter_gguf::read(&agguf, &cfg).unwrap();
    assert!((read.cfg.scale() - scale).abs() < 1e-6);
    for (l, t, p) in adapter.iter() {
        let q = read.get(l, t).unwrap();
        assert!(max_diff(&p.a, &q.a) == 0.0 && max_diff(&p.b, &q.b) == 0.0);
    }

    // rope_freqs has no config.json form: the HF export is refused, nothing written.
    let hf = tmp.path().join("hf");
    let o = fuse(&base, &adapter_dir, &hf, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("rope_freqs"));
    assert!(!hf.exists());
}

#[test]
fn smollm2_q4_1_fuses_with_dequantize_to_hf_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2();
    let adapter = smollm2_adapter(&tmp.path().join("adapter"));
    let data = write_chat_data(&tmp.path().join("data"), 2);
    let base = eval_loss(&model, &data, None);
    let with = eval_loss(&model, &data, Some(&adapter));
    assert!(
        (base - with).abs() > 0.05,
        "adapter changes little: {base} vs {with}"
    );

    // A quantized base is not merged silently.
    let hf = tmp.path().join("hf");
    let o = fuse(&model, &adapter, &hf, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--dequantize") && err.contains("Q4_1"),
        "{err}"
    );
    assert!(!hf.exists());

    let report = fuse_ok(
        &model,
        &adapter,
        &hf,
        &[
            "--dequantize",
            "--hf-dtype",
            "f32",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    eprintln!("{report}");
    let l_hf = eval_loss(&hf, &data, None);
    assert!((l_hf - with).abs() < 1e-4, "hf: {l_hf} vs {with}");
    // The padding and unknown tokens are named in tokenizer_config.json, and a conversion back
    // to GGUF finds their ids again (the HF directory used to leave them out).
    let g = GgufFile::open(&model).unwrap();
    let vocab = g.config().unwrap().vocab_size;
    let back = your_ai::export::gguf_tokenizer::from_hf_dir(&hf, vocab, &[]).unwrap();
    let mut named = 0;
    for key in [
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        let want = g.metadata(key).map(|v| v.to_u32().unwrap());
        let got = back.iter().find(|(k, _)| k == key);
        assert_eq!(got.map(|(_, v)| v.to_u32().unwrap()), want, "{key}");
        named += usize::from(want.is_some());
    }
    assert!(named > 0, "SmolLM2's GGUF names neither");
    let mut figures = vec![("hf f32", l_hf - with)];
    for (ty, tol) in [("f16", 2e-3), ("q8_0", 2e-2)] {
        let path = tmp.path().join(format!("m-{ty}.gguf"));
        fuse_ok(
            &model,
            &adapter,
            &path,
            &["--dequantize", "--gguf-type", ty],
        );
        let l = eval_loss(&path, &data, None);
        figures.push((ty, l - with));
        assert!((l - with).abs() < tol, "gguf {ty}: {l} vs {with}");
        // The base's provenance and licence carry over (they were dropped).
        let g = GgufFile::open(&path).unwrap();
        for (key, want) in [
            ("general.license", "apache-2.0"),
            ("general.organization", "HuggingFaceTB"),
            ("general.type", "model"),
        ] {
            assert_eq!(g.meta_str(key), Some(want), "{key}");
        }
    }
    eprintln!(
        "SmolLM2 base {base:.4}, base + adapter {with:.4}; merged minus unmerged: {figures:?}"
    );
}

#[test]
fn written_gguf_reads_back_with_same_logits() {
    // Quantization-free round trip: a fused f32 GGUF of a zero adapter gives the base's logits.
    let run = tiny_run(1);
    let cfg = hf_config(&run.model);
    let adapter = run.root.join("zero");
    random_adapter(&cfg, &adapter, 0.0, 3);
    let path = run.root.join("m.gguf");
    fuse_ok(&run.model, &adapter, &path, &["--gguf-type", "f32"]);
    let a = your_ai::model::load(
        run.model.to_str().unwrap(),
        &your_ai::model::LoadOptions::cpu_f32(),
        None,
    )
    .unwrap();
    let b = your_ai::model::load(
        path.to_str().unwrap(),
        &your_ai::model::LoadOptions::cpu_f32(),
        None,
    )
    .unwrap();
    let text = "<|im_start|>user\nHello there, 12345!<|im_end|>\n";
    let ids = a.tokenizer.encode(text).unwrap();
    assert_eq!(ids, b.tokenizer.encode(text).unwrap());
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let la = a.model.forward(&t, &mut Default::default()).unwrap();
    let lb = b.model.forward(&t, &mut Default::default()).unwrap();
    assert!(max_diff(&la, &lb) < 1e-4);
    assert_eq!(a.tokenizer.end_ids, b.tokenizer.end_ids);
}

/// SentencePiece tokenizers (Llama 2, Mistral) go HF → GGUF metadata (scores from merge ranks)
/// → the tokenizer our GGUF loader builds, and tokenize as before.
#[test]
fn sentencepiece_tokenizer_survives_hf_to_gguf() {
    let mut vocab: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    for b in 0..=255u8 {
        vocab.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (i, p) in [
        "▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁h", "▁w", "or", "el", "ell", "ello",
        "▁hello", "ld", "orld", "▁world",
    ]
    .iter()
    .enumerate()
    {
        vocab.push((p.to_string(), -(i as f32), 1));
    }
    let tmp = tempfile::tempdir().unwrap();
    let orig = tmp.path().join("orig.gguf");
    let tokens: Vec<(&str, f32, i32)> = vocab
        .iter()
        .map(|(t, s, ty)| (t.as_str(), *s, *ty))
        .collect();
    write_spm_gguf(&orig, &tokens);
    let g = GgufFile::open(&orig).unwrap();
    let before = your_ai::data::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    // As a Hugging Face directory (what a Llama 2 checkpoint ships) ...
    let hf = tmp.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let doc = your_ai::data::tokenizer::gguf::tokenizer_json(&g).unwrap();
    std::fs::write(hf.join("tokenizer.json"), doc.to_string()).unwrap();
    std::fs::write(
        hf.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true,
            "pad_token": {"content": "</s>"}}"#,
    )
    .unwrap();
    // ... then back to GGUF metadata, and read by our GGUF tokenizer path.
    let meta = your_ai::export::gguf_tokenizer::from_hf_dir(&hf, vocab.len() + 2, &[2]).unwrap();
    let mut all = vec![(
        "general.architecture".to_string(),
        GValue::String("llama".into()),
    )];
    all.extend(meta);
    let refs: Vec<(&str, &GValue)> = all.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let back_path = tmp.path().join("back.gguf");
    let mut f = std::fs::File::create(&back_path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &refs, &[]).unwrap();
    drop(f);
    let gb = GgufFile::open(&back_path).unwrap();
    assert_eq!(gb.meta_str("tokenizer.ggml.model"), Some("llama"));
    let after = your_ai::data::tokenizer::Tokenizer::from_gguf(&gb).unwrap();
    for text in ["hello world", "hex", "hello world hex", "ollld wow"] {
        assert_eq!(
            before.encode(text).unwrap(),
            after.encode(text).unwrap(),
            "{text}"
        );
    }
    assert!(after.add_bos && after.is_end(2));
    let id = |key: &str| gb.metadata(key).map(|v| v.to_u32().unwrap());
    assert_eq!(id("tokenizer.ggml.padding_token_id"), Some(2));
    assert_eq!(id("tokenizer.ggml.unknown_token_id"), Some(0));
    assert_eq!(after.bos_id(), Some(1));
    // Two padding ids beyond the tokenizer get placeholder tokens.
    assert_eq!(after.vocab_size(), vocab.len() + 2);
}
