//! The tiny model, adapter, examples and oracles the gradient tests share: candle's autograd
//! over composite ops in f64, and the explicit step's loss and gradients:
//! for tests/train_gradients.rs and tests/weighted_gradients.rs.

#![allow(dead_code)]

use super::common::{tiny_weights, write_hf_dir, TinySpec};
use candle_core::{DType, Device, Tensor, Var, D};
use your_ai::data::batch::Row;
use your_ai::data::Sample;
use your_ai::engine::candle::batch::micro_batch;
use your_ai::engine::candle::step::{Grads, MicroBatch, Step};
use your_ai::model::lora::{Adapter, LoraConfig, Target};
use your_ai::model::{Llama, ModelConfig};
use your_ai::runtime::memory::Meter;
use your_ai::weights::{SafetensorsDir, WeightStore};

/// The step of `model` and `adapter`, without a memory limit.
pub fn step<'a>(model: &'a Llama, adapter: &'a Adapter, keep_blocks: usize) -> Step<'a> {
    static METER: std::sync::OnceLock<Meter> = std::sync::OnceLock::new();
    Step {
        model,
        adapter,
        keep_blocks,
        meter: METER.get_or_init(Meter::resident),
    }
}

pub fn tiny_model(spec: &TinySpec, dir: &std::path::Path) -> Llama {
    write_hf_dir(dir, spec, &tiny_weights(spec, 21), DType::F32);
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(dir).unwrap());
    Llama::load(&store, cfg, DType::F64, &Device::Cpu).unwrap()
}

/// An adapter on `layers` with random A and B (B = 0 would hide every dA).
pub fn random_adapter(model: &Llama, layers: Vec<usize>, targets: Vec<Target>) -> Adapter {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets,
        layers,
        use_rslora: false,
    };
    let mut a = Adapter::init(cfg, &model.cfg, 3, &Device::Cpu).unwrap();
    for (i, t) in a.tensors_mut().enumerate() {
        if t.dims()[1] == 4 {
            // Seeded (Box-Muller over a fixed generator) so every run draws the same adapter.
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + i as u64);
            let n: usize = t.dims().iter().product();
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                    (0.2 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect();
            *t = (Tensor::from_vec(vals, t.dims(), &Device::Cpu).unwrap()
                * (1.0 + i as f64 * 1e-3))
                .unwrap();
        }
    }
    a.to_dtype(DType::F64).unwrap()
}

pub fn samples() -> Vec<Sample> {
    let mk = |ids: Vec<u32>, trained_from: usize| Sample {
        trained: (0..ids.len()).map(|i| i >= trained_from).collect(),
        ids,
        truncated: 0,
        untrained_turns: 0,
    };
    vec![
        mk(vec![1, 5, 9, 33, 2, 7, 60, 12, 3], 4),
        mk(vec![1, 44, 8, 8, 17], 2),
        mk(vec![1, 90, 91, 15, 16, 70, 71], 3),
        mk(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 6),
    ]
}

pub fn rows(s: &[Sample]) -> Vec<Row> {
    s.iter().map(|s| Row::single(s, 1.0)).collect()
}

pub fn batch(model: &Llama, rows: &[Row]) -> MicroBatch {
    micro_batch(model, &rows.iter().collect::<Vec<_>>()).unwrap()
}

/// Each adapter pair as autograd variables, for [`autograd_loss`].
pub fn autograd_vars(adapter: &Adapter) -> Vec<(usize, Target, Var, Var)> {
    adapter
        .iter()
        .map(|(l, t, p)| {
            (
                l,
                t,
                Var::from_tensor(&p.a).unwrap(),
                Var::from_tensor(&p.b).unwrap(),
            )
        })
        .collect()
}

/// Loss (mean CE over scored tokens) through candle autograd with composite ops only.
pub fn autograd_loss(
    model: &Llama,
    vars: &[(usize, Target, Var, Var)],
    scale: f64,
    mb: &MicroBatch,
) -> Tensor {
    let cfg = &model.cfg;
    let (b, t) = mb.ids.dims2().unwrap();
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let eps = cfg.rms_norm_eps;
    let norm = |x: &Tensor, w: &Tensor| {
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
    };
    let softmax = |x: &Tensor| {
        let e = x
            .broadcast_sub(&x.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    };
    let mask = mb
        .mask
        .to_dtype(DType::F64)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let mut x = model
        .embed(&mb.ids)
        .unwrap()
        .reshape((b * t, cfg.hidden_size))
        .unwrap();
    for (l, blk) in model.blocks.iter().enumerate() {
        let proj = |lin: &your_ai::model::llama::Linear, x: &Tensor, target: Target| {
            let mut y = x
                .matmul(&lin.weight.dense(x.dtype()).unwrap().t().unwrap())
                .unwrap();
            if let Some(bias) = &lin.bias {
                y = y.broadcast_add(bias).unwrap();
            }
            if let Some((_, _, a, bm)) = vars.iter().find(|v| v.0 == l && v.1 == target) {
                // LoRA dropout: the branch sees the masked input, the frozen weight the plain one.
                let x = match mb.dropout {
                    Some((p, seed)) => {
                        let (r, c) = x.dims2().unwrap();
                        (x * your_ai::model::ops::dropout::dropout_mask(
                            p,
                            seed,
                            l,
                            target,
                            0..r,
                            c,
                            x,
                        )
                        .unwrap())
                        .unwrap()
                    }
                    None => x.clone(),
                };
                let delta = x
                    .matmul(&a.as_tensor().t().unwrap())
                    .unwrap()
                    .matmul(&bm.as_tensor().t().unwrap())
                    .unwrap();
                y = (y + (delta * scale).unwrap()).unwrap();
            }
            y
        };
        let h = norm(&x, &blk.input_norm);
        let heads = |y: Tensor, n: usize| {
            y.reshape((b, t, n, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = heads(proj(&blk.q_proj, &h, Target::Q), nh);
        let k = heads(proj(&blk.k_proj, &h, Target::K), nkv);
        let v = heads(proj(&blk.v_proj, &h, Target::V), nkv);
        let q = candle_nn::rotary_emb::rope_slow(&q, &mb.cos, &mb.sin).unwrap();
        let k = candle_nn::rotary_emb::rope_slow(&k, &mb.cos, &mb.sin).unwrap();
        // Plain GQA: repeat each K/V head for its query heads.
        let rep = nh / nkv;
        let expand = |x: Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .repeat((1, 1, rep, 1, 1))
                .unwrap()
                .reshape((b, nh, t, hd))
                .unwrap()
        };
        let (k, v) = (expand(k), expand(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let scores = if mask.rank() == 2 {
            scores.broadcast_add(&mask).unwrap()
        } else {
            scores.broadcast_add(&mask.unsqueeze(1).unwrap()).unwrap()
        };
        let attn = softmax(&scores)
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * t, nh * hd))
            .unwrap();
        x = (x + proj(&blk.o_proj, &attn, Target::O)).unwrap();
        let h = norm(&x, &blk.post_norm);
        let g = proj(&blk.gate_proj, &h, Target::Gate);
        let silu = (&g / (g.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
        let act = (silu * proj(&blk.up_proj, &h, Target::Up)).unwrap();
        x = (x + proj(&blk.down_proj, &act, Target::Down)).unwrap();
    }
    let h = norm(&x.index_select(&mb.target_rows, 0).unwrap(), &model.norm);
    let logits = model.lm_head.matmul_t(&h).unwrap();
    let lse = logits
        .broadcast_sub(&logits.max_keepdim(D::Minus1).unwrap())
        .unwrap()
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap()
        .broadcast_add(&logits.max_keepdim(D::Minus1).unwrap())
        .unwrap();
    let picked = logits
        .gather(&mb.target_ids.unsqueeze(1).unwrap(), D::Minus1)
        .unwrap();
    // Σ w·CE / Σ w, with each target's weight (all 1 for plain training: the mean CE).
    let w = mb.target_weights.to_dtype(DType::F64).unwrap();
    let ce = (lse - picked).unwrap().squeeze(1).unwrap();
    let total_w = w.sum_all().unwrap().to_scalar::<f64>().unwrap();
    ((ce * w).unwrap().sum_all().unwrap() / total_w).unwrap()
}

/// Loss Σ w·CE / Σ w·n and its gradient, as the trainer forms them from weighted rows.
pub fn explicit_weighted(model: &Llama, adapter: &Adapter, mbs: &[MicroBatch]) -> (f64, Grads) {
    let total: f64 = mbs
        .iter()
        .map(|m| {
            m.target_weights
                .to_dtype(DType::F64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum();
    let mut grads = Grads::new(adapter);
    let mut weighted = 0.0;
    for mb in mbs {
        weighted += step(model, adapter, 0)
            .forward_backward(mb, 1.0 / total, &mut grads, &mut Default::default())
            .unwrap()
            .weighted;
    }
    (weighted / total, grads)
}

pub fn explicit(model: &Llama, adapter: &Adapter, mbs: &[MicroBatch]) -> (f64, Grads) {
    let total: usize = mbs.iter().map(|m| m.n_targets).sum();
    let mut grads = Grads::new(adapter);
    let mut ce = 0.0;
    for mb in mbs {
        ce += step(model, adapter, 0)
            .forward_backward(mb, 1.0 / total as f64, &mut grads, &mut Default::default())
            .unwrap()
            .ce;
    }
    (ce / total as f64, grads)
}

pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let s = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-12);
    d / s
}
