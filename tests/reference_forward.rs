//! The forward pass against an independent reference: plain loops over `Vec<f64>` written
//! from the Llama definition, on tiny random models saved to disk as safetensors and as GGUF.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{tiny_weights, write_gguf, write_hf_dir, TinySpec, Weights};
use your_ai::model::{KvCache, Llama, ModelConfig};
use your_ai::weights::{GgufFile, SafetensorsDir, WeightStore};

fn get<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w[name].0
}

/// y = W x for W `[out, in]` row-major.
fn matvec(w: &[f32], x: &[f64], out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|o| (0..inp).map(|i| w[o * inp + i] as f64 * x[i]).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * *g as f64).collect()
}

fn inv_freq(spec: &TinySpec) -> Vec<f64> {
    let factors = if spec.llama3_scaling {
        common::rope_freq_factors(spec)
    } else {
        vec![1.0; spec.head_dim() / 2]
    };
    let d = spec.head_dim();
    (0..d / 2)
        .map(|i| 1.0 / spec.rope_theta.powf((2 * i) as f64 / d as f64) / factors[i] as f64)
        .collect()
}

/// Rotate-half RoPE on one head vector at position `pos`.
fn rope(x: &mut [f64], pos: usize, freqs: &[f64]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (c, s) = ((pos as f64 * freqs[i]).cos(), (pos as f64 * freqs[i]).sin());
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// Logits for every position of `ids`, straight from the definition.
fn reference_logits(spec: &TinySpec, w: &Weights, ids: &[u32]) -> Vec<Vec<f64>> {
    let (h, hd, nh, nkv) = (spec.hidden, spec.head_dim(), spec.heads, spec.kv_heads);
    let freqs = inv_freq(spec);
    let emb = get(w, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| {
            emb[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in 0..spec.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let add_bias = |v: &mut Vec<f64>, name: &str| {
            if spec.qkv_bias {
                for (x, b) in v.iter_mut().zip(get(w, &p(name))) {
                    *x += *b as f64;
                }
            }
        };
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, get(w, &p("input_layernorm.weight")), spec.eps);
            let mut q = matvec(get(w, &p("self_attn.q_proj.weight")), &n, nh * hd);
            let mut k = matvec(get(w, &p("self_attn.k_proj.weight")), &n, nkv * hd);
            let mut v = matvec(get(w, &p("self_attn.v_proj.weight")), &n, nkv * hd);
            add_bias(&mut q, "self_attn.q_proj.bias");
            add_bias(&mut k, "self_attn.k_proj.bias");
            add_bias(&mut v, "self_attn.v_proj.bias");
            for head in q.chunks_mut(hd) {
                rope(head, pos, &freqs);
            }
            for head in k.chunks_mut(hd) {
                rope(head, pos, &freqs);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for i in 0..xs.len() {
            let mut attn = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(get(w, &p("self_attn.o_proj.weight")), &attn, h);
            for (x, y) in xs[i].iter_mut().zip(o) {
                *x += y;
            }
            let n = rms_norm(
                &xs[i],
                get(w, &p("post_attention_layernorm.weight")),
                spec.eps,
            );
            let g = matvec(get(w, &p("mlp.gate_proj.weight")), &n, spec.intermediate);
            let u = matvec(get(w, &p("mlp.up_proj.weight")), &n, spec.intermediate);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(get(w, &p("mlp.down_proj.weight")), &act, h);
            for (x, y) in xs[i].iter_mut().zip(d) {
                *x += y;
            }
        }
    }
    let head = if spec.tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    xs.iter()
        .map(|x| {
            matvec(
                get(w, head),
                &rms_norm(x, get(w, "model.norm.weight"), spec.eps),
                spec.vocab,
            )
        })
        .collect()
}

fn ours(model: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&input, &mut KvCache::new(model.blocks.len()))
        .unwrap();
    logits.squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - *y as f64).abs())
        .fold(0.0, f64::max)
}

fn load_hf(dir: &std::path::Path, dtype: DType) -> Llama {
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(dir).unwrap());
    Llama::load(&store, cfg, dtype, &Device::Cpu).unwrap()
}

fn load_gguf(path: &std::path::Path) -> Llama {
    let g = GgufFile::open(path).unwrap();
    let cfg = g.config().unwrap();
    Llama::load(&WeightStore::Gguf(g), cfg, DType::F32, &Device::Cpu).unwrap()
}

const IDS: [u32; 12] = [1, 17, 5, 90, 33, 33, 2, 64, 8, 71, 0, 45];

#[test]
fn safetensors_forward_matches_reference() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            tied: true,
            llama3_scaling: false,
            ..Default::default()
        },
        TinySpec {
            qkv_bias: true,
            kv_heads: 1,
            ..Default::default()
        },
    ] {
        let w = tiny_weights(&spec, 7);
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(dir.path(), &spec, &w, DType::F32);
        let reference = reference_logits(&spec, &w, &IDS);
        let got = ours(&load_hf(dir.path(), DType::F32), &IDS);
        let diff = max_abs_diff(&reference, &got);
        assert!(diff < 1e-4, "{spec:?}: max |Δlogit| = {diff}");
    }
}

#[test]
fn half_precision_checkpoints_load_and_agree() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec, 3);
    let reference = reference_logits(&spec, &w, &IDS);
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(dir.path(), &spec, &w, dtype);
        // Stored in half precision, computed in f32: only the rounding of the weights differs.
        let diff = max_abs_diff(&reference, &ours(&load_hf(dir.path(), DType::F32), &IDS));
        assert!(diff < 0.15, "{dtype:?}: max |Δlogit| = {diff}");
        assert!(diff > 0.0);
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec, 11);
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(dir.path(), &spec, &w, DType::F32);
    let model = load_hf(dir.path(), DType::F32);
    let full = ours(&model, &IDS);
    let mut cache = KvCache::new(model.blocks.len());
    // A prompt of 5 tokens, then one token at a time.
    let mut steps = vec![];
    let prompt = Tensor::new(&IDS[..5], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = model
        .forward(&prompt, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    steps.extend(l.to_vec2::<f32>().unwrap());
    for &t in &IDS[5..] {
        let x = Tensor::new(&[t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        steps.extend(
            model
                .forward(&x, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), IDS.len());
    let full64: Vec<Vec<f64>> = full
        .iter()
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    assert!(max_abs_diff(&full64, &steps) < 1e-4);
}

#[test]
fn gguf_f32_and_q8_0_match_reference() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec, 5);
    let reference = reference_logits(&spec, &w, &IDS);
    let dir = tempfile::tempdir().unwrap();

    let f32_path = dir.path().join("tiny-f32.gguf");
    write_gguf(&f32_path, &spec, &w, GgmlDType::F32, "llama");
    let cfg = GgufFile::open(&f32_path).unwrap().config().unwrap();
    assert!(matches!(
        cfg.rope_scaling,
        Some(your_ai::model::RopeScaling::Factors(_))
    ));
    let diff = max_abs_diff(&reference, &ours(&load_gguf(&f32_path), &IDS));
    assert!(diff < 1e-4, "F32 GGUF: max |Δlogit| = {diff}");

    let q8_path = dir.path().join("tiny-q8_0.gguf");
    write_gguf(&q8_path, &spec, &w, GgmlDType::Q8_0, "llama");
    let diff = max_abs_diff(&reference, &ours(&load_gguf(&q8_path), &IDS));
    let scale = reference
        .iter()
        .flatten()
        .map(|v| v.abs())
        .fold(0.0, f64::max);
    // Q8_0 rounds each weight to 1/127 of its block's largest: about 1% of the logit scale.
    assert!(
        diff < 0.02 * scale && diff > 1e-6,
        "Q8_0 GGUF: max |Δlogit| = {diff} (scale {scale})"
    );
}

#[test]
fn gguf_permutation_is_needed() {
    // Without undoing llama.cpp's row permutation the logits would differ: check the GGUF
    // really stores permuted rows and that we read back the original ones.
    let spec = TinySpec::default();
    let w = tiny_weights(&spec, 9);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &spec, &w, GgmlDType::F32, "llama");
    let g = GgufFile::open(&path).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let raw = g
        .qtensor("blk.0.attn_q.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let ours = g.get_hf(name, &w[name].1, &Device::Cpu).unwrap();
    let orig = Tensor::from_vec(w[name].0.clone(), w[name].1.as_slice(), &Device::Cpu).unwrap();
    let d = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(d(&ours, &orig), 0.0);
    assert!(d(&raw, &orig) > 0.1);
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let spec = TinySpec::default();
    let w = tiny_weights(&spec, 13);
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(dir.path(), &spec, &w, DType::F32);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    // Two shards and an index, as transformers writes them.
    let mut shards: [std::collections::HashMap<String, Tensor>; 2] = Default::default();
    let mut map = serde_json::Map::new();
    for (i, (name, (v, shape))) in w.iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert(
            name.clone(),
            Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap(),
        );
        map.insert(
            name.clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1).into(),
        );
    }
    for (i, s) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            s,
            dir.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let diff = max_abs_diff(
        &reference_logits(&spec, &w, &IDS),
        &ours(&load_hf(dir.path(), DType::F32), &IDS),
    );
    assert!(diff < 1e-4, "sharded: max |Δlogit| = {diff}");
}

#[test]
fn every_supported_gguf_type_loads_within_its_precision() {
    // k-quants use 256-wide blocks: a model whose rows are multiples of 256.
    let spec = TinySpec {
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        intermediate: 512,
        vocab: 96,
        layers: 1,
        ..Default::default()
    };
    let w = tiny_weights(&spec, 17);
    let reference = reference_logits(&spec, &w, &IDS[..6]);
    let scale = reference
        .iter()
        .flatten()
        .map(|v| v.abs())
        .fold(0.0, f64::max);
    let dir = tempfile::tempdir().unwrap();
    // Bound on each weight's relative RMS rounding error, from the type's bits per weight
    // (measured errors are about half of these).
    for (ty, tol) in [
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 8e-3),
        (GgmlDType::Q8_0, 1e-2),
        (GgmlDType::Q6K, 3e-2),
        (GgmlDType::Q5K, 6e-2),
        (GgmlDType::Q4K, 0.12),
        (GgmlDType::Q4_1, 0.12),
        (GgmlDType::Q4_0, 0.15),
    ] {
        let path = dir.path().join(format!("tiny-{ty:?}.gguf"));
        write_gguf(&path, &spec, &w, ty, "llama");
        let g = GgufFile::open(&path).unwrap();
        for (name, (v, shape)) in w.iter().filter(|(_, (_, s))| s.len() == 2) {
            let got: Vec<f32> = g
                .get_hf(name, shape, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err: f64 = got
                .iter()
                .zip(v)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = v.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                err / norm < tol && err > 0.0,
                "{ty:?} {name}: relative RMS error {}",
                err / norm
            );
        }
        // And the model runs on it: logits track the reference (errors compound through layers).
        let diff = max_abs_diff(&reference, &ours(&load_gguf(&path), &IDS[..6]));
        assert!(
            diff < 20.0 * tol * scale,
            "{ty:?}: max |Δlogit| = {diff} (scale {scale})"
        );
    }
}
