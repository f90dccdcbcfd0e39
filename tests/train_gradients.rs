//! The explicit block-wise backward against two independent computations on a tiny random
//! Llama in f64: candle's autograd over composite ops (none of candle's backward-less fused
//! kernels), and central finite differences of the loss.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{tiny_weights, write_hf_dir, TinySpec};
use your_ai::data::batch::{pack, Row};
use your_ai::data::Sample;
use your_ai::engine::candle::batch::micro_batch;
use your_ai::engine::candle::step::{Grads, MicroBatch, Step};
use your_ai::model::lora::{Adapter, LoraConfig, Target};
use your_ai::model::{Llama, ModelConfig};
use your_ai::runtime::memory::Meter;
use your_ai::weights::{SafetensorsDir, WeightStore};

/// The step of `model` and `adapter`, without a memory limit.
fn step<'a>(model: &'a Llama, adapter: &'a Adapter, keep_blocks: usize) -> Step<'a> {
    static METER: std::sync::OnceLock<Meter> = std::sync::OnceLock::new();
    Step {
        model,
        adapter,
        keep_blocks,
        meter: METER.get_or_init(Meter::resident),
    }
}

fn tiny_model(spec: &TinySpec, dir: &std::path::Path) -> Llama {
    write_hf_dir(dir, spec, &tiny_weights(spec, 21), DType::F32);
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(dir).unwrap());
    Llama::load(&store, cfg, DType::F64, &Device::Cpu).unwrap()
}

/// An adapter on `layers` with random A and B (B = 0 would hide every dA).
fn random_adapter(model: &Llama, layers: Vec<usize>, targets: Vec<Target>) -> Adapter {
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

fn samples() -> Vec<Sample> {
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

fn rows(s: &[Sample]) -> Vec<Row> {
    s.iter().map(|s| Row::single(s, 1.0)).collect()
}

fn batch(model: &Llama, rows: &[Row]) -> MicroBatch {
    micro_batch(model, &rows.iter().collect::<Vec<_>>()).unwrap()
}

/// Loss (mean CE over scored tokens) through candle autograd with composite ops only.
fn autograd_loss(
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
fn explicit_weighted(model: &Llama, adapter: &Adapter, mbs: &[MicroBatch]) -> (f64, Grads) {
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

fn explicit(model: &Llama, adapter: &Adapter, mbs: &[MicroBatch]) -> (f64, Grads) {
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

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
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

/// The f32 step runs the fused CPU kernels (GEMM-fused LoRA linears, SwiGLU, the RMSNorm and
/// softmax backwards); the f64 step runs the composite ops that the autograd test below checks.
/// Same weights, same adapter: the two must agree to f32 precision on every target.
#[test]
fn fused_f32_kernels_match_the_f64_composite_step() {
    let gqa_bias = TinySpec {
        qkv_bias: true,
        kv_heads: 1,
        tied: true,
        ..Default::default()
    };
    for spec in [TinySpec::default(), gqa_bias] {
        let dir = tempfile::tempdir().unwrap();
        let m64 = tiny_model(&spec, dir.path());
        let cfg = ModelConfig::from_hf_file(&dir.path().join("config.json")).unwrap();
        let store = WeightStore::Safetensors(SafetensorsDir::open(dir.path()).unwrap());
        let m32 = Llama::load(&store, cfg, DType::F32, &Device::Cpu).unwrap();
        let a64 = random_adapter(&m64, vec![0, 1], Target::ALL.to_vec());
        let a32 = a64.to_dtype(DType::F32).unwrap();
        for (dropout, chunk) in [(None, None), (Some((0.3, 99)), None), (None, Some(7))] {
            let mut mb64 = batch(&m64, &rows(&samples()));
            let mut mb32 = batch(&m32, &rows(&samples()));
            mb64.dropout = dropout;
            mb32.dropout = dropout;
            // The f32 kernels on row chunks (narrowed views) against the unchunked f64 step.
            mb32.mlp_chunk_rows = chunk;
            let (l64, g64) = explicit(&m64, &a64, std::slice::from_ref(&mb64));
            let (l32, g32) = explicit(&m32, &a32, std::slice::from_ref(&mb32));
            assert!((l64 - l32).abs() < 1e-5 * l64.abs(), "loss {l32} vs {l64}");
            for (l, t, _) in a64.iter() {
                let (a, b) = g64.pairs[l][t.index()].as_ref().unwrap();
                let (fa, fb) = g32.pairs[l][t.index()].as_ref().unwrap();
                for (name, want, got) in [("A", a, fa), ("B", b, fb)] {
                    let rel = max_rel_diff(want, &got.to_dtype(DType::F64).unwrap());
                    assert!(
                        rel < 1e-4,
                        "layer {l} {t:?} d{name} (dropout {dropout:?}): relative difference {rel}"
                    );
                }
            }
        }
    }
}

#[test]
fn explicit_backward_matches_autograd_on_every_target() {
    let gqa_bias = TinySpec {
        qkv_bias: true,
        kv_heads: 1,
        tied: true,
        ..Default::default()
    };
    // `Some(n)`: the MLP in chunks of n rows (5 does not divide the batch's rows: the last
    // chunk is shorter), with and without dropout (whose masks each chunk draws by offset).
    for (spec, dropout, chunk) in [
        (TinySpec::default(), None, None),
        (gqa_bias.clone(), None, None),
        (TinySpec::default(), Some((0.3, 99)), None),
        (TinySpec::default(), None, Some(5)),
        (gqa_bias, Some((0.3, 99)), Some(5)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(&spec, dir.path());
        let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
        let mut mb = batch(&model, &rows(&samples()));
        assert!(!mb.ids.elem_count().is_multiple_of(5));
        mb.dropout = dropout;
        mb.mlp_chunk_rows = chunk;
        let (loss, grads) = explicit(&model, &adapter, std::slice::from_ref(&mb));

        let vars: Vec<(usize, Target, Var, Var)> = adapter
            .iter()
            .map(|(l, t, p)| {
                (
                    l,
                    t,
                    Var::from_tensor(&p.a).unwrap(),
                    Var::from_tensor(&p.b).unwrap(),
                )
            })
            .collect();
        let oracle = autograd_loss(&model, &vars, adapter.cfg.scale(), &mb);
        assert!(
            (oracle.to_scalar::<f64>().unwrap() - loss).abs() < 1e-9,
            "loss {loss} vs {oracle}"
        );
        let store = oracle.backward().unwrap();
        for (l, t, a, b) in &vars {
            let (ga, gb) = grads.pairs[*l][t.index()].as_ref().unwrap();
            let (oa, ob) = (
                store.get(a.as_tensor()).unwrap(),
                store.get(b.as_tensor()).unwrap(),
            );
            for (name, ours, theirs) in [("A", ga, oa), ("B", gb, ob)] {
                let rel = max_rel_diff(theirs, ours);
                assert!(
                    rel < 1e-8,
                    "layer {l} {t:?} d{name}: relative difference {rel}"
                );
                let norm = ours
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(norm > 1e-6, "layer {l} {t:?} d{name} is zero");
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let mbs = [batch(&model, &rows(&samples()))];
    let (_, grads) = explicit(&model, &adapter, &mbs);
    let h = 1e-5;
    for (l, t, which, idx) in [
        (0, Target::Q, 0, 5),
        (0, Target::K, 1, 3),
        (1, Target::V, 0, 17),
        (0, Target::O, 1, 40),
        (1, Target::Gate, 0, 2),
        (0, Target::Up, 1, 9),
        (1, Target::Down, 0, 100),
    ] {
        let loss_at = |delta: f64| {
            let mut a = adapter.clone();
            let p = a.pairs[l][t.index()].as_mut().unwrap();
            let m = if which == 0 { &mut p.a } else { &mut p.b };
            let mut v = m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[idx] += delta;
            *m = Tensor::from_vec(v, m.dims(), &Device::Cpu).unwrap();
            explicit(&model, &a, &mbs).0
        };
        let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
        let (ga, gb) = grads.pairs[l][t.index()].as_ref().unwrap();
        let g = if which == 0 { ga } else { gb };
        let ours = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
        assert!(
            (fd - ours).abs() < 1e-6 * (1.0 + fd.abs()),
            "layer {l} {t:?}: fd {fd} vs {ours}"
        );
    }
}

#[test]
fn accumulating_two_batches_of_two_equals_one_batch_of_four() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let r = rows(&samples());
    let (l4, g4) = explicit(&model, &adapter, &[batch(&model, &r)]);
    let (l22, g22) = explicit(
        &model,
        &adapter,
        &[batch(&model, &r[..2]), batch(&model, &r[2..])],
    );
    assert!((l4 - l22).abs() < 1e-12);
    for (a, b) in g4.tensors().zip(g22.tensors()) {
        assert!(max_rel_diff(a, b) < 1e-10);
    }
}

#[test]
fn packed_rows_equal_separate_documents() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let s = samples();
    let refs: Vec<&Sample> = s.iter().collect();
    let packed = pack(&refs, &[1.0; 4], 20);
    assert!(packed.len() < 4);
    let (lp, gp) = explicit(&model, &adapter, &[batch(&model, &packed)]);
    let (ls, gs) = explicit(&model, &adapter, &[batch(&model, &rows(&s))]);
    assert!((lp - ls).abs() < 1e-10, "{lp} vs {ls}");
    for (a, b) in gp.tensors().zip(gs.tensors()) {
        assert!(max_rel_diff(a, b) < 1e-8);
    }
}

/// With a sliding window shorter than the documents, packed rows still equal the documents
/// as separate rows (the packed mask keeps the window), on the composite path (f64) and the
/// fused kernels (f32); and the window does change the loss.
#[test]
fn packed_rows_under_a_sliding_window_equal_separate_documents() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let plain = tiny_model(&spec, dir.path());
    let cfg = ModelConfig::from_hf_file(&dir.path().join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(dir.path()).unwrap());
    let s = samples();
    let refs: Vec<&Sample> = s.iter().collect();
    let packed = pack(&refs, &[1.0; 4], 20);
    assert!(packed.len() < 4 && packed.iter().any(|r| r.len() > 4));
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let mut windowed = cfg.clone();
        windowed.sliding_window = Some(3);
        let model = Llama::load(&store, windowed, dtype, &Device::Cpu).unwrap();
        let adapter = random_adapter(&plain, vec![0, 1], Target::ALL.to_vec())
            .to_dtype(dtype)
            .unwrap();
        let (lp, gp) = explicit(&model, &adapter, &[batch(&model, &packed)]);
        let (ls, gs) = explicit(&model, &adapter, &[batch(&model, &rows(&s))]);
        assert!((lp - ls).abs() < tol * ls.abs(), "{dtype:?}: {lp} vs {ls}");
        for (a, b) in gp.tensors().zip(gs.tensors()) {
            let (a, b) = (
                a.to_dtype(DType::F64).unwrap(),
                b.to_dtype(DType::F64).unwrap(),
            );
            assert!(max_rel_diff(&a, &b) < tol * 100.0, "{dtype:?}");
        }
        let unwindowed = Llama::load(&store, cfg.clone(), dtype, &Device::Cpu).unwrap();
        let (lu, _) = explicit(&unwindowed, &adapter, &[batch(&unwindowed, &rows(&s))]);
        assert!(
            (lu - ls).abs() > 1e-3,
            "{dtype:?}: the window changes nothing"
        );
    }
}

#[test]
fn backward_stops_at_the_lowest_adapted_block() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let full = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let mut top = full.clone();
    top.cfg.layers = vec![1];
    top.pairs[0] = Default::default();
    let mbs = [batch(&model, &rows(&samples()))];
    let (_, gf) = explicit(&model, &full, &mbs);
    let (_, gt) = explicit(&model, &top, &mbs);
    // Block 1's gradients do not depend on whether block 0 is adapted... except through its
    // forward, so compare against a full adapter whose block-0 B is zero.
    let mut zero0 = full.clone();
    for p in zero0.pairs[0].iter_mut().flatten() {
        p.b = p.b.zeros_like().unwrap();
    }
    let (_, gz) = explicit(&model, &zero0, &mbs);
    for t in Target::ALL {
        let (a, b) = gt.pairs[1][t.index()].as_ref().unwrap();
        let (za, zb) = gz.pairs[1][t.index()].as_ref().unwrap();
        assert!(max_rel_diff(za, a) < 1e-10 && max_rel_diff(zb, b) < 1e-10);
    }
    assert!(gt.pairs[0].iter().all(Option::is_none));
    assert!(gf.pairs[0].iter().all(Option::is_some));
}

#[test]
fn keeping_activations_gives_the_same_gradients_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    // One MLP chunk, and chunks of 5 rows (a kept block keeps its gate and up by chunk).
    for chunk in [None, Some(5)] {
        let mut mb = batch(&model, &rows(&samples()));
        mb.mlp_chunk_rows = chunk;
        let run = |keep: usize| {
            let mut g = Grads::new(&adapter);
            let mut p = your_ai::engine::candle::step::Profile::default();
            let l = step(&model, &adapter, keep)
                .forward_backward(&mb, 0.1, &mut g, &mut p)
                .unwrap();
            (l.ce, g, p)
        };
        let (l0, g0, _) = run(0);
        for keep in [1, 2, 5] {
            let (l, g, p) = run(keep);
            assert_eq!(l.to_bits(), l0.to_bits());
            for (a, b) in g0.tensors().zip(g.tensors()) {
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                );
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "keep {keep}"
                );
            }
            // Kept blocks are not recomputed.
            assert!(keep < 2 || p.recompute.is_zero(), "keep {keep} recomputed");
        }
        assert!(run(2).2.recompute.is_zero());
    }
}

/// Distrust weights c of four examples from made-up (w, H): D = 2.7·(ln(1 − w + 1e-8) + H)².
fn distrust_weights(lambda: f64) -> Vec<f32> {
    use your_ai::distrust::formula::{example_weights, Provenance};
    let prov: Vec<Provenance> = [(0.05, 3.0), (0.9, 0.1), (0.5, 1.0), (0.3, 0.2)]
        .iter()
        .map(|&(w, h)| Provenance {
            auth_weight: w,
            prov_entropy: h,
        })
        .collect();
    example_weights(&prov, 2.7, lambda).c
}

fn weighted_rows(s: &[Sample], c: &[f32]) -> Vec<Row> {
    s.iter().zip(c).map(|(s, &c)| Row::single(s, c)).collect()
}

#[test]
fn distrust_weighted_gradient_equals_autograd_of_the_explicitly_weighted_ce() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let c = distrust_weights(0.6);
    assert!(c.iter().any(|&c| (c - 1.0).abs() > 0.3), "{c:?}");
    let r = weighted_rows(&samples(), &c);
    // Accumulated over two micro-batches, normalised by Σ c·n of the whole batch.
    let (loss, grads) = explicit_weighted(
        &model,
        &adapter,
        &[batch(&model, &r[..2]), batch(&model, &r[2..])],
    );
    let vars: Vec<(usize, Target, Var, Var)> = adapter
        .iter()
        .map(|(l, t, p)| {
            (
                l,
                t,
                Var::from_tensor(&p.a).unwrap(),
                Var::from_tensor(&p.b).unwrap(),
            )
        })
        .collect();
    // The oracle: Σ_i c_i·CE_sum_i / Σ_i c_i·n_i written out per example (per-example CE
    // sums from autograd, the weighting done here on scalars-as-tensors).
    let s = samples();
    let mut num: Option<Tensor> = None;
    let mut den = 0.0;
    for (i, sample) in s.iter().enumerate() {
        let mb = batch(&model, &rows(std::slice::from_ref(sample)));
        let ce_sum =
            (autograd_loss(&model, &vars, adapter.cfg.scale(), &mb) * mb.n_targets as f64).unwrap();
        let term = (ce_sum * c[i] as f64).unwrap();
        num = Some(match num {
            Some(n) => (n + term).unwrap(),
            None => term,
        });
        den += c[i] as f64 * mb.n_targets as f64;
    }
    let oracle = (num.unwrap() / den).unwrap();
    assert!(
        (oracle.to_scalar::<f64>().unwrap() - loss).abs() < 1e-9,
        "loss {loss} vs {oracle}"
    );
    let store = oracle.backward().unwrap();
    for (l, t, a, b) in &vars {
        let (ga, gb) = grads.pairs[*l][t.index()].as_ref().unwrap();
        for (name, ours, theirs) in [
            ("A", ga, store.get(a.as_tensor()).unwrap()),
            ("B", gb, store.get(b.as_tensor()).unwrap()),
        ] {
            let rel = max_rel_diff(theirs, ours);
            assert!(
                rel < 1e-8,
                "layer {l} {t:?} d{name}: relative difference {rel}"
            );
        }
    }
    // And it differs from the plain gradient: the weighting acts.
    let (_, plain) = explicit(&model, &adapter, &[batch(&model, &rows(&s))]);
    let moved = grads
        .tensors()
        .zip(plain.tensors())
        .map(|(a, b)| max_rel_diff(b, a))
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "weighted and plain gradients agree ({moved})");
}

#[test]
fn lambda_zero_gives_the_plain_gradient_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let c = distrust_weights(0.0);
    assert!(c.iter().all(|&c| c == 1.0));
    let s = samples();
    let (lw, gw) = explicit_weighted(&model, &adapter, &[batch(&model, &weighted_rows(&s, &c))]);
    let (lp, gp) = explicit(&model, &adapter, &[batch(&model, &rows(&s))]);
    assert_eq!(lw.to_bits(), lp.to_bits());
    for (a, b) in gw.tensors().zip(gp.tensors()) {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// Mean CE of one example under `adapter`.
fn example_loss(model: &Llama, adapter: &Adapter, s: &Sample) -> f64 {
    explicit(
        model,
        adapter,
        &[batch(model, &rows(std::slice::from_ref(s)))],
    )
    .0
}

#[test]
fn the_high_distrust_example_moves_the_model_more() {
    use your_ai::distrust::formula::{example_weights, Provenance};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let s = samples();
    let two = [s[0].clone(), s[2].clone()];
    // Example 0: primary-source-like (w 0.05, H 3): D ≈ 23. Example 1: w 0.5, H 0.8: D ≈ 0.4.
    let prov = [(0.05, 3.0), (0.5, 0.8)].map(|(w, h)| Provenance {
        auth_weight: w,
        prov_entropy: h,
    });
    let ew = example_weights(&prov, 2.7, 0.6);
    assert!(ew.d[0] > 20.0 * ew.d[1], "{:?}", ew.d);
    // One small plain gradient-descent step from the same start, weighted and unweighted.
    let step = |c: &[f32]| {
        let (_, g) = explicit_weighted(&model, &adapter, &[batch(&model, &weighted_rows(&two, c))]);
        let mut a = adapter.clone();
        for (p, g) in a.tensors_mut().zip(g.tensors()) {
            *p = (&*p - (g * 0.02).unwrap()).unwrap();
        }
        a
    };
    let plain = step(&[1.0, 1.0]);
    let weighted = step(&ew.c);
    let drop = |a: &Adapter, i: usize| {
        example_loss(&model, &adapter, &two[i]) - example_loss(&model, a, &two[i])
    };
    let (p0, p1, w0, w1) = (
        drop(&plain, 0),
        drop(&plain, 1),
        drop(&weighted, 0),
        drop(&weighted, 1),
    );
    assert!(
        p0 > 0.0 && w0 > 0.0,
        "the step lowers the loss ({p0}, {w0})"
    );
    // The high-D example improves more than under plain training, the low-D one less.
    assert!(w0 > p0 * 1.05, "high D: weighted {w0} vs plain {p0}");
    assert!(w1 < p1, "low D: weighted {w1} vs plain {p1}");
}

/// The samples as preference pairs: (0 chosen, 1 rejected), (2 chosen, 3 rejected).
fn pairs() -> Vec<your_ai::data::preference::Pair> {
    let s = samples();
    vec![
        your_ai::data::preference::Pair {
            chosen: s[0].clone(),
            rejected: s[1].clone(),
        },
        your_ai::data::preference::Pair {
            chosen: s[2].clone(),
            rejected: s[3].clone(),
        },
    ]
}

/// The preference sums of `pairs` for `model` carrying `adapter`.
fn pair_sums(
    model: &mut Llama,
    adapter: Option<Adapter>,
    pairs: &[your_ai::data::preference::Pair],
    method: your_ai::engine::objective::Method,
    beta: f64,
) -> your_ai::engine::objective::PreferenceSums {
    model.adapter = adapter;
    your_ai::engine::candle::preference::evaluate(model, pairs, 2, method, beta).unwrap()
}

/// DPO's and ORPO's gradients through the step (per-answer weights on the SFT backward)
/// against central finite differences of the objective, as `eval --method` computes it.
#[test]
fn preference_gradients_match_finite_differences() {
    use your_ai::engine::candle::preference;
    use your_ai::engine::objective::{Method, PreferenceLoss};
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let pairs = pairs();
    let rows = your_ai::data::preference::pair_rows(&pairs);
    let mb = batch(&model, &rows);
    let chosen_tokens: usize = pairs.iter().map(|p| p.chosen.trained_count()).sum();
    for (method, beta) in [(Method::Dpo, 0.5), (Method::Orpo, 0.3)] {
        let loss = PreferenceLoss {
            method,
            beta,
            pair_scale: 0.5,
            token_scale: 1.0 / chosen_tokens as f64,
        };
        let mut grads = Grads::new(&adapter);
        let sums = preference::accumulate(
            &step(&model, &adapter, 0),
            &mb,
            &loss,
            &mut grads,
            &mut Default::default(),
        )
        .unwrap();
        assert_eq!(sums.pairs, 2);
        // The step's own objective is the evaluated one.
        let at =
            pair_sums(&mut model, Some(adapter.clone()), &pairs, method, beta).objective(method);
        assert!((sums.objective(method) - at).abs() < 1e-10, "{method:?}");
        let h = 1e-5;
        for (l, t, which, idx) in [
            (0, Target::Q, 0, 5),
            (1, Target::V, 1, 17),
            (0, Target::O, 1, 40),
            (1, Target::Down, 0, 100),
        ] {
            let mut loss_at = |delta: f64| {
                let mut a = adapter.clone();
                let p = a.pairs[l][t.index()].as_mut().unwrap();
                let m = if which == 0 { &mut p.a } else { &mut p.b };
                let mut v = m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[idx] += delta;
                *m = Tensor::from_vec(v, m.dims(), &Device::Cpu).unwrap();
                pair_sums(&mut model, Some(a), &pairs, method, beta).objective(method)
            };
            let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
            let (ga, gb) = grads.pairs[l][t.index()].as_ref().unwrap();
            let g = if which == 0 { ga } else { gb };
            let ours = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
            assert!(
                (fd - ours).abs() < 1e-6 * (1.0 + fd.abs()),
                "{method:?} layer {l} {t:?}: fd {fd} vs {ours}"
            );
            assert!(ours.abs() > 1e-8, "{method:?} layer {l} {t:?}: no gradient");
        }
    }
}

/// DPO's reference is the base model: the same whatever adapter the policy carries, and equal
/// to the policy's own log-probabilities when there is no adapter (every reward then 0).
#[test]
fn the_dpo_reference_does_not_depend_on_the_adapter() {
    use your_ai::engine::objective::Method;
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_model(&TinySpec::default(), dir.path());
    let one = pairs()[..1].to_vec();
    let beta = 0.25;
    // With one pair: ref log π(chosen) = log π(chosen) − reward/β, and log π = −Σ CE.
    let reference = |model: &mut Llama, adapter: Option<Adapter>| {
        let s = pair_sums(model, adapter, &one, Method::Dpo, beta);
        (-s.chosen_ce - s.chosen_reward / beta, s.chosen_reward)
    };
    let (base, reward) = reference(&mut model, None);
    assert_eq!(reward, 0.0);
    let a1 = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let a2 = random_adapter(&model, vec![1], vec![Target::Q, Target::Down]);
    for a in [a1, a2] {
        let (r, reward) = reference(&mut model, Some(a));
        assert!(reward.abs() > 1e-6, "the adapter changes the policy");
        assert!((r - base).abs() < 1e-9, "reference {r} vs base {base}");
    }
}

/// Two micro-batches of one pair each, accumulated, give the gradient of one micro-batch of
/// both pairs (each pair weighs 1/pairs of the accumulated batch).
#[test]
fn accumulating_pairs_equals_one_batch_of_pairs() {
    use your_ai::engine::candle::preference;
    use your_ai::engine::objective::{Method, PreferenceLoss};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let pairs = pairs();
    let chosen_tokens: usize = pairs.iter().map(|p| p.chosen.trained_count()).sum();
    for method in [Method::Dpo, Method::Orpo] {
        let loss = PreferenceLoss {
            method,
            beta: 0.3,
            pair_scale: 0.5,
            token_scale: 1.0 / chosen_tokens as f64,
        };
        let run = |groups: &[&[your_ai::data::preference::Pair]]| {
            let mut grads = Grads::new(&adapter);
            let mut sums = your_ai::engine::objective::PreferenceSums::default();
            for g in groups {
                let mb = batch(&model, &your_ai::data::preference::pair_rows(g));
                let s = preference::accumulate(
                    &step(&model, &adapter, 0),
                    &mb,
                    &loss,
                    &mut grads,
                    &mut Default::default(),
                )
                .unwrap();
                sums.merge(&s);
            }
            (sums, grads)
        };
        let (one, g1) = run(&[&pairs]);
        let (two, g2) = run(&[&pairs[..1], &pairs[1..]]);
        assert!((one.objective(method) - two.objective(method)).abs() < 1e-12);
        for (l, t, _) in adapter.iter() {
            let (a1, b1) = g1.pairs[l][t.index()].as_ref().unwrap();
            let (a2, b2) = g2.pairs[l][t.index()].as_ref().unwrap();
            assert!(
                max_rel_diff(a1, a2) < 1e-10 && max_rel_diff(b1, b2) < 1e-10,
                "{method:?} {l} {t:?}"
            );
        }
    }
}

/// The head over more rows than three chunks gives each scored row its own cross-entropy, in
/// order, with every chunk's losses read back together: against log-softmax over the whole
/// `[rows, vocab]` logits at once, in f64 (candle's ops) and f32 (the fused kernel).
#[test]
fn head_rows_over_many_chunks_are_each_rows_own_loss() {
    use your_ai::model::ops::head::{head_rows, Targets, HEAD_CHUNK};
    use your_ai::model::ops::rms_norm::rms_norm;
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let m64 = tiny_model(&spec, dir.path());
    let cfg = ModelConfig::from_hf_file(&dir.path().join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(dir.path()).unwrap());
    let m32 = Llama::load(&store, cfg, DType::F32, &Device::Cpu).unwrap();
    let n = 3 * HEAD_CHUNK + 41;
    let h = m64.cfg.hidden_size;
    let x = Tensor::randn(0f64, 1.0, (n + 5, h), &Device::Cpu).unwrap();
    // Every row but the first five is scored, each against its own target.
    let vocab = m64.cfg.vocab_size as u32;
    let rows = Tensor::arange(5u32, (n + 5) as u32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab).collect();
    let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let weights = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let targets = Targets {
        rows: &rows,
        ids: &ids_t,
        weights: &weights,
    };
    let xs = x.narrow(0, 5, n).unwrap();
    let normed = rms_norm(&xs, &m64.norm, m64.cfg.rms_norm_eps as f32).unwrap();
    // In f64 throughout (`Llama::logits` would round to f32).
    let logits = m64.lm_head.matmul_t(&normed).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let want: Vec<f64> = ids
        .iter()
        .enumerate()
        .map(|(r, &t)| -logp[r][t as usize])
        .collect();
    for (model, x, scale, tol) in [
        (&m64, x.clone(), None, 1e-9),
        (&m32, x.to_dtype(DType::F32).unwrap(), Some(1.0), 1e-4),
    ] {
        let (got, _) = head_rows(model, &x, &targets, scale).unwrap();
        assert_eq!(got.len(), n);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "row {r}: {g} vs {w}"
            );
        }
    }
}
