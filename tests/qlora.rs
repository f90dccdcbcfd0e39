//! QLoRA: block weights kept quantized (`--quantize 4|8`, or a quantized GGUF as stored). The
//! explicit backward's LoRA gradients over a quantized base match finite differences and equal
//! those over the dense dequantized weights; a quantized GGUF keeps its own blocks; SmolLM2
//! learns with a 4-bit base.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::*;
use your_ai::data::batch::Row;
use your_ai::data::Sample;
use your_ai::engine::candle::batch::micro_batch;
use your_ai::engine::candle::step::{Grads, Step};
use your_ai::model::lora::{Adapter, LoraConfig, Target};
use your_ai::model::quantized::{QuantBits, Weight};
use your_ai::model::{Llama, ModelConfig};
use your_ai::runtime::memory::Meter;
use your_ai::weights::{GgufFile, SafetensorsDir, WeightStore};

fn tiny(dir: &std::path::Path, quant: Option<QuantBits>) -> Llama {
    let spec = TinySpec::default();
    write_hf_dir(dir, &spec, &tiny_weights(&spec, 21), DType::F32);
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(dir).unwrap());
    Llama::load_with(&store, cfg, DType::F64, &Device::Cpu, quant).unwrap()
}

/// The same model with every quantized weight replaced by its dequantized dense copy.
fn dequantized(model: &Llama) -> Llama {
    let mut blocks = model.blocks.clone();
    for b in &mut blocks {
        for l in [
            &mut b.q_proj,
            &mut b.k_proj,
            &mut b.v_proj,
            &mut b.o_proj,
            &mut b.gate_proj,
            &mut b.up_proj,
            &mut b.down_proj,
        ] {
            l.weight = Weight::Dense(l.weight.dense(DType::F64).unwrap());
        }
    }
    Llama {
        cfg: model.cfg.clone(),
        embed_tokens: model.embed_tokens.clone(),
        blocks,
        norm: model.norm.clone(),
        lm_head: model.lm_head.clone(),
        rope: model.rope.clone(),
        dtype: model.dtype,
        device: model.device.clone(),
        adapter: None,
    }
}

fn adapter(model: &Llama) -> Adapter {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        layers: vec![0, 1],
        use_rslora: false,
    };
    let mut a = Adapter::init(cfg, &model.cfg, 3, &Device::Cpu).unwrap();
    for (i, t) in a.tensors_mut().enumerate() {
        if i % 2 == 1 {
            let n = t.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|j| ((j * 7 + i) % 13) as f32 / 30.0 - 0.2)
                .collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    a.to_dtype(DType::F64).unwrap()
}

fn loss_and_grads(model: &Llama, a: &Adapter) -> (f64, Grads) {
    let mk = |ids: Vec<u32>, from: usize| Sample {
        trained: (0..ids.len()).map(|i| i >= from).collect(),
        ids,
        truncated: 0,
        untrained_turns: 0,
    };
    let samples = [
        mk(vec![1, 5, 9, 33, 2, 7, 60, 12, 3], 4),
        mk(vec![1, 44, 8, 8, 17], 2),
    ];
    let rows: Vec<Row> = samples.iter().map(|s| Row::single(s, 1.0)).collect();
    let mb = micro_batch(model, &rows.iter().collect::<Vec<_>>()).unwrap();
    let mut g = Grads::new(a);
    let n = mb.n_targets as f64;
    let meter = Meter::resident();
    let step = Step {
        model,
        adapter: a,
        keep_blocks: 0,
        meter: &meter,
    };
    let ce = step
        .forward_backward(&mb, 1.0 / n, &mut g, &mut Default::default())
        .unwrap()
        .ce;
    (ce / n, g)
}

#[test]
fn lora_gradients_over_a_quantized_base_match_finite_differences_and_the_dense_path() {
    for bits in [QuantBits::Four, QuantBits::Eight] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(dir.path(), Some(bits));
        assert!(model
            .blocks
            .iter()
            .all(|b| b.linears().iter().all(|l| l.weight.is_quantized())));
        let a = adapter(&model);
        let (loss, grads) = loss_and_grads(&model, &a);

        // Same numbers as the dense computation on the dequantized weights.
        let (dense_loss, dense_grads) = loss_and_grads(&dequantized(&model), &a);
        assert!((loss - dense_loss).abs() < 1e-12, "{loss} vs {dense_loss}");
        for (x, y) in grads.tensors().zip(dense_grads.tensors()) {
            let d: f64 = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-12, "{bits:?}: {d}");
        }

        let h = 1e-5;
        for (l, t, which, idx) in [
            (0, Target::Q, 0, 5),
            (1, Target::K, 1, 3),
            (1, Target::V, 0, 17),
            (0, Target::O, 1, 40),
            (1, Target::Gate, 0, 2),
            (0, Target::Up, 1, 9),
            (1, Target::Down, 0, 100),
        ] {
            let at = |delta: f64| {
                let mut b = a.clone();
                let p = b.pairs[l][t.index()].as_mut().unwrap();
                let m = if which == 0 { &mut p.a } else { &mut p.b };
                let mut v = m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[idx] += delta;
                *m = Tensor::from_vec(v, m.dims(), &Device::Cpu).unwrap();
                loss_and_grads(&model, &b).0
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let (ga, gb) = grads.pairs[l][t.index()].as_ref().unwrap();
            let g = if which == 0 { ga } else { gb };
            let ours = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
            assert!(ours.abs() > 1e-8, "{bits:?} layer {l} {t:?}: zero gradient");
            assert!(
                (fd - ours).abs() < 1e-6 * (1.0 + fd.abs()),
                "{bits:?} layer {l} {t:?}: fd {fd} vs {ours}"
            );
        }
    }
}

#[test]
fn quantized_gguf_keeps_its_own_blocks_and_gives_the_dequantized_logits() {
    let spec = TinySpec::default();
    let tmp = tempfile::tempdir().unwrap();
    for (stored, bits) in [
        (GgmlDType::Q8_0, QuantBits::Four),
        (GgmlDType::Q4_0, QuantBits::Eight),
    ] {
        let path = tmp.path().join(format!("m-{stored:?}.gguf"));
        write_gguf(&path, &spec, &tiny_weights(&spec, 9), stored, "llama");
        let load = |q: Option<QuantBits>| {
            let g = GgufFile::open(&path).unwrap();
            let cfg = g.config().unwrap();
            Llama::load_with(&WeightStore::Gguf(g), cfg, DType::F32, &Device::Cpu, q).unwrap()
        };
        let dense = load(None);
        let quant = load(Some(bits));
        for b in &quant.blocks {
            for l in b.linears() {
                match &l.weight {
                    // The file's own type, not the --quantize one.
                    Weight::Quantized(q) => assert_eq!(q.dtype(), stored),
                    Weight::Dense(_) => panic!("block weight not kept quantized"),
                }
            }
        }
        // Byte-wise q/k un-permutation gives exactly the dense loader's (dequantize, then
        // un-permute) weights, hence its logits.
        let ids = Tensor::new(&[[1u32, 5, 9, 33, 2, 7, 60, 12]], &Device::Cpu).unwrap();
        let a = dense.forward(&ids, &mut Default::default()).unwrap();
        let b = quant.forward(&ids, &mut Default::default()).unwrap();
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-4, "{stored:?}: {d}");
        assert!(quant.frozen_weight_bytes() < dense.frozen_weight_bytes());
    }
}

#[test]
fn quantize_flag_is_checked() {
    let run = tiny_run(1);
    let o = cli()
        .args(["eval", "--quantize", "3", "--model"])
        .arg(&run.model)
        .arg("--data")
        .arg(&run.data)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("'3' for '--quantize") && e.contains("give 4 or 8"),
        "{e}"
    );
}

/// Frozen weights of SmolLM2 as stored (Q4_1 blocks) against dequantized f32.
#[test]
fn smollm2_q4_1_base_stays_quantized_in_memory() {
    let g = GgufFile::open(&smollm2()).unwrap();
    let cfg = g.config().unwrap();
    let store = WeightStore::Gguf(g);
    let q = Llama::load_with(
        &store,
        cfg.clone(),
        DType::F32,
        &Device::Cpu,
        Some(QuantBits::Four),
    )
    .unwrap();
    let d = Llama::load(&store, cfg, DType::F32, &Device::Cpu).unwrap();
    let (qb, db) = (q.frozen_weight_bytes(), d.frozen_weight_bytes());
    eprintln!("SmolLM2 frozen weights: {qb} bytes kept quantized, {db} bytes dequantized to f32");
    assert!(qb * 2 < db, "{qb} vs {db}");
    let ids = Tensor::new(&[[1u32, 504, 3000, 28, 9]], &Device::Cpu).unwrap();
    let a = d.forward(&ids, &mut Default::default()).unwrap();
    let b = q.forward(&ids, &mut Default::default()).unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn smollm2_learns_with_a_4_bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invented-country");
    let o = cli()
        .args(["train", "--quantize", "4", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "16",
            "--batch-size",
            "4",
            "--lora-rank",
            "16",
            "--learning-rate",
            "3e-4",
            "--warmup-steps",
            "3",
            "--max-seq-length",
            "256",
            "--steps-per-eval",
            "0",
            "--val-batches",
            "0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let evals = metrics(&out.join("metrics.jsonl"), "eval");
    let first = evals.first().unwrap()["val_loss"].as_f64().unwrap();
    let last = evals.last().unwrap()["val_loss"].as_f64().unwrap();
    eprintln!("SmolLM2 --quantize 4: validation loss {first} -> {last}");
    assert!(
        (1.0..4.0).contains(&first),
        "initial validation loss {first}"
    );
    assert!(last < 0.75 * first, "validation loss {first} → {last}");
}

/// Peak resident memory of a short SmolLM2 run on rows that fill `--max-seq-length` exactly
/// (so the pre-flight estimate, which sizes every batch at full length, describes this run),
/// and that estimate: `(measured peak, estimated peak)` of the whole run, load included.
fn measured_and_estimated_peak(quantize: Option<&str>, dir: &std::path::Path) -> (f64, f64) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Plain-text rows of the example's own words, each longer than 128 tokens.
    let words: Vec<String> = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/invented-country/train.jsonl"),
    )
    .unwrap()
    .split_whitespace()
    .map(|w| {
        w.chars()
            .filter(|c| c.is_alphanumeric())
            .collect::<String>()
    })
    .filter(|w| !w.is_empty())
    .collect();
    let rows: String = (0..8)
        .map(|r| {
            let text: Vec<&str> = (0..160)
                .map(|i| words[(r * 37 + i) % words.len()].as_str())
                .collect();
            format!("{}\n", serde_json::json!({ "text": text.join(" ") }))
        })
        .collect();
    std::fs::write(data.join("train.jsonl"), rows).unwrap();
    let out = dir.join(quantize.unwrap_or("f32"));
    let mut c = cli();
    c.args(["train", "--model"]).arg(smollm2());
    if let Some(q) = quantize {
        c.args(["--quantize", q]);
    }
    let o = c
        .arg("--data")
        .arg(data.join("train.jsonl"))
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--max-seq-length",
            "128",
            "--lora-rank",
            "16",
            "--steps-per-eval",
            "0",
            "--no-save-best",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = out.join("metrics.jsonl");
    let start = &metrics(&m, "start")[0];
    let end = &metrics(&m, "end")[0];
    (
        end["peak_rss_bytes"].as_f64().unwrap(),
        start["estimate_peak_bytes"].as_f64().unwrap(),
    )
}

#[test]
fn a_4_bit_base_needs_less_memory_than_f32_and_the_estimate_says_how_much() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_peak, f32_est) = measured_and_estimated_peak(None, tmp.path());
    let (q4_peak, q4_est) = measured_and_estimated_peak(Some("4"), tmp.path());
    eprintln!(
        "SmolLM2, batch 4 x 128, rank 16: f32 peak {:.3} GB (estimate {:.3}), --quantize 4 peak {:.3} GB (estimate {:.3})",
        f32_peak / 1e9,
        f32_est / 1e9,
        q4_peak / 1e9,
        q4_est / 1e9
    );
    // The frozen linears go from 4 bytes a weight to 5 bits: ~0.36 GB of SmolLM2's 0.54 GB.
    assert!(q4_peak < f32_peak - 0.2e9, "{q4_peak} vs {f32_peak}");
    for (name, peak, est) in [
        ("f32", f32_peak, f32_est),
        ("--quantize 4", q4_peak, q4_est),
    ] {
        let err = (est - peak) / peak;
        assert!(
            err.abs() <= 0.15,
            "{name}: estimate {est} vs measured {peak} ({:+.1}%)",
            100.0 * err
        );
    }
}

/// `--quantize 4 --reload-interval 3` on SmolLM2: every reload brings the base back through
/// the same load, still quantized, so the run's peak resident memory is the run's without
/// reloads (within 5%) and its losses and adapter are the same, bit for bit.
#[test]
fn reloading_keeps_the_base_quantized() {
    let tmp = tempfile::tempdir().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/invented-country");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = cli()
            .args(["train", "--model"])
            .arg(smollm2())
            .args(["--data", data, "--quantize", "4"])
            .arg("--output")
            .arg(&out)
            .args([
                "--max-steps",
                "6",
                "--batch-size",
                "2",
                "--max-seq-length",
                "96",
                "--lora-rank",
                "8",
                "--learning-rate",
                "1e-3",
                "--warmup-steps",
                "1",
                "--steps-per-eval",
                "0",
                "--save-every",
                "0",
                "--no-save-best",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let m = out.join("metrics.jsonl");
        let losses: Vec<u64> = metrics(&m, "train")
            .iter()
            .map(|l| l["loss"].as_f64().unwrap().to_bits())
            .collect();
        let peak = metrics(&m, "end")[0]["train_peak_rss_bytes"]
            .as_f64()
            .unwrap();
        let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        (losses, peak, adapter, metrics(&m, "reload"))
    };
    let (plain, plain_peak, plain_adapter, _) = run("plain", &[]);
    let (reloaded, peak, adapter, reloads) = run("reloaded", &["--reload-interval", "3"]);
    assert_eq!(reloads.len(), 1, "one reload, after step 3");
    assert_eq!(plain, reloaded);
    assert_eq!(plain_adapter, adapter);
    eprintln!(
        "peak resident memory after loading: {:.3} GB without reloads, {:.3} GB with",
        plain_peak / 1e9,
        peak / 1e9
    );
    assert!(
        (peak - plain_peak).abs() <= 0.05 * plain_peak,
        "{peak} vs {plain_peak}"
    );
    let r = &reloads[0];
    let (before, after) = (
        r["rss_before_bytes"].as_f64().unwrap(),
        r["rss_after_bytes"].as_f64().unwrap(),
    );
    assert!(after <= before * 1.05, "{r}");
}
