//! The explicit block-wise backward against two independent computations on a tiny random
//! Llama in f64: candle's autograd over composite ops (none of candle's backward-less fused
//! kernels), and central finite differences of the loss.

mod common;
#[path = "common/gradients.rs"]
mod gradients;

use candle_core::{DType, Device, Tensor, D};
use common::TinySpec;
use gradients::*;
use your_ai::data::batch::pack;
use your_ai::data::Sample;
use your_ai::engine::candle::step::Grads;
use your_ai::model::lora::Target;
use your_ai::model::{Llama, ModelConfig};
use your_ai::weights::{SafetensorsDir, WeightStore};

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

        let vars = autograd_vars(&adapter);
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
