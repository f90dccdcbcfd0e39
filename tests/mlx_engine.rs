//! The MLX engine against the candle engine, through the engine seam, on MLX's CPU backend: the
//! same adapter, the same batches, the same optimizer steps; losses equal to 1e-4 relative over
//! 20 steps in f32 on a tiny random Llama and on SmolLM2. Also: its gradients against finite
//! differences for every LoRA target, exact resume from its saved state, `--quantize 4`
//! learning, and a bf16 run that holds no f64 array. Built only with the `mlx` feature.
#![cfg(feature = "mlx")]

mod common;

use common::mlx::*;

use candle_core::DType;
use mlx_rs::{Array, Dtype};
use your_ai::data::batch::Row;
use your_ai::data::preference::Pair;
use your_ai::engine::mlx::step::Evaluation::{BlockByBlock, Deferred};
use your_ai::engine::mlx::{batch, convert, graph, params::Params, step};
use your_ai::engine::objective::{Method, PreferenceLoss};
use your_ai::engine::{Engine, MicroBatchRows, Profile};
use your_ai::model::load;
use your_ai::model::lora::Target;
use your_ai::model::quantized::QuantBits;

#[test]
fn mlx_losses_equal_candle_losses_over_20_steps_on_a_tiny_llama() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, None);
    let mut c = candle_engine(spec, &o);
    let mut m = mlx_engine(spec, &o, 0);
    let a = adapter(c.config(), vec![0, 1]);
    c.set_adapter(a.clone(), None).unwrap();
    m.set_adapter(a, None).unwrap();
    let batches: Vec<Vec<Row>> = (0..20)
        .map(|s| rows(96, &[9 + s % 5, 17 - s % 4], s as u32))
        .collect();
    let lc = train(&mut c, &batches, 1e-2);
    let lm = train(&mut m, &batches, 1e-2);
    assert!(lc[19] < lc[0], "the run learns: {lc:?}");
    assert_losses_match("tiny Llama", &lm, &lc, 1e-4);
    // Both blocks keeping their frozen products: the same run.
    let mut kept = mlx_engine(spec, &o, 2);
    kept.set_adapter(adapter(kept.config(), vec![0, 1]), None)
        .unwrap();
    assert_losses_match(
        "tiny Llama, kept products",
        &train(&mut kept, &batches, 1e-2),
        &lc,
        1e-4,
    );
    // Pairs on some targets of the top block only: groups with a target left out, groups
    // without a pair, a block without any.
    let some = [Target::Q, Target::V, Target::Gate];
    let mut c = candle_engine(spec, &o);
    let mut m = mlx_engine(spec, &o, 1);
    let a = partial(adapter(c.config(), vec![0, 1]), 1, &some);
    c.set_adapter(a.clone(), None).unwrap();
    m.set_adapter(a, None).unwrap();
    let lc = train(&mut c, &batches, 1e-2);
    assert!(lc[19] < lc[0], "the run learns: {lc:?}");
    assert_losses_match(
        "tiny Llama, q, v and gate of block 1",
        &train(&mut m, &batches, 1e-2),
        &lc,
        1e-4,
    );
}

/// Rows long enough that the LM head takes several chunks (more than `HEAD_CHUNK` scored rows
/// a micro-batch): the chunks, ordered one after another in MLX's graph, each with its own
/// written-out gradient, still give the candle engine's losses.
#[test]
fn mlx_losses_equal_candle_losses_across_head_chunks() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, None);
    let mut c = candle_engine(spec, &o);
    let mut m = mlx_engine(spec, &o, 0);
    let a = adapter(c.config(), vec![0, 1]);
    c.set_adapter(a.clone(), None).unwrap();
    m.set_adapter(a, None).unwrap();
    let batches: Vec<Vec<Row>> = (0..6)
        .map(|s| rows(96, &[700 - s, 601 + s, 400], s as u32))
        .collect();
    let scored: usize = batches[0]
        .iter()
        .map(|r| r.trained.iter().filter(|&&t| t).count())
        .sum();
    assert!(
        scored > 2 * your_ai::engine::mlx::head::HEAD_CHUNK,
        "{scored} scored rows"
    );
    let lc = train(&mut c, &batches, 1e-2);
    let lm = train(&mut m, &batches, 1e-2);
    assert_losses_match("several head chunks", &lm, &lc, 1e-4);
}

/// `--pack` on MLX: each document sees only itself and its positions restart, as in the candle
/// engine: the losses agree over 20 steps.
#[test]
fn mlx_losses_equal_candle_losses_on_packed_rows() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, None);
    let mut c = candle_engine(spec, &o);
    let mut m = mlx_engine(spec, &o, 0);
    let a = adapter(c.config(), vec![0, 1]);
    c.set_adapter(a.clone(), None).unwrap();
    m.set_adapter(a, None).unwrap();
    let batches: Vec<Vec<Row>> = (0..20)
        .map(|s| packed_rows(96, &[6 + s % 5, 9, 5 + s % 3, 11], s as u32, 24))
        .collect();
    assert!(
        batches
            .iter()
            .all(|b| b.iter().any(|r| r.doc.last() > Some(&0))),
        "every batch holds a packed row"
    );
    let lc = train(&mut c, &batches, 1e-2);
    let lm = train(&mut m, &batches, 1e-2);
    assert!(lc[19] < lc[0], "the run learns: {lc:?}");
    assert_losses_match("packed rows", &lm, &lc, 1e-4);
}

/// `steps` optimizer steps of preference pairs (each batch's rows: chosen, rejected, pair after
/// pair) under `method`; each step's objective and reward accuracy.
fn train_pairs<E: Engine>(engine: &mut E, batches: &[Vec<Row>], method: Method) -> Vec<(f64, f64)> {
    let mut out = vec![];
    for b in batches {
        let chosen_tokens: usize = b.iter().step_by(2).map(Row::scored).sum();
        let loss = PreferenceLoss {
            method,
            beta: 0.5,
            pair_scale: 2.0 / b.len() as f64,
            token_scale: 1.0 / chosen_tokens as f64,
        };
        let batch = MicroBatchRows {
            rows: b,
            dropout: None,
            loss_scale: 1.0,
        };
        let sums = engine
            .accumulate_pairs(&batch, &loss, &mut Profile::default())
            .unwrap();
        engine.clip_gradients(1.0).unwrap();
        engine.update(2e-3).unwrap();
        out.push((sums.objective(method), sums.accuracy()));
    }
    out
}

/// DPO and ORPO on MLX (the reference pass with the adapter off, each answer's weight on its
/// tokens' gradient) give the candle engine's objective and reward accuracy step after step,
/// and its held-out sums after training.
#[test]
fn mlx_preference_methods_equal_candle() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, None);
    for method in [Method::Dpo, Method::Orpo] {
        let mut c = candle_engine(spec, &o);
        let mut m = mlx_engine(spec, &o, 0);
        let a = adapter(c.config(), vec![0, 1]);
        c.set_adapter(a.clone(), None).unwrap();
        m.set_adapter(a, None).unwrap();
        // Two batches of two pairs, in turns: the objective on each falls.
        let batches: Vec<Vec<Row>> = (0..12)
            .map(|s| rows(96, &[10 + s % 2, 8, 12, 9 + s % 2], (s % 2) as u32))
            .collect();
        let lc = train_pairs(&mut c, &batches, method);
        let lm = train_pairs(&mut m, &batches, method);
        let objective = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert!(
            lc[10].0 < lc[0].0 && lc[11].0 < lc[1].0,
            "{method:?} learns: {lc:?}"
        );
        // DPO's loss is a difference of sums of log-probabilities (policy − reference), which
        // f32 rounding in either engine moves by ~1e-5 relative.
        assert_losses_match(
            &format!("{method:?}"),
            &objective(&lm),
            &objective(&lc),
            1e-3,
        );
        let accuracy = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
        assert_eq!(accuracy(&lm), accuracy(&lc), "{method:?} reward accuracy");

        let held: Vec<Pair> = rows(96, &[11, 9, 7, 13], 99)
            .chunks(2)
            .map(|p| Pair {
                chosen: sample(&p[0]),
                rejected: sample(&p[1]),
            })
            .collect();
        let (ec, em) = (
            c.evaluate_pairs(&held, 2, method, 0.5).unwrap(),
            m.evaluate_pairs(&held, 2, method, 0.5).unwrap(),
        );
        assert_losses_match(
            &format!("{method:?} held out"),
            &[em.objective(method), em.margin()],
            &[ec.objective(method), ec.margin()],
            1e-3,
        );
    }
}

#[test]
fn mlx_losses_equal_candle_losses_over_20_steps_on_smollm2() {
    let _s = serial();
    let path = common::smollm2();
    let spec = path.to_str().unwrap();
    let o = opts(DType::F32, None);
    let mut c = candle_engine(spec, &o);
    let mut m = mlx_engine(spec, &o, 0);
    // The top four blocks adapted, as `--num-layers 4`.
    let a = adapter(c.config(), (26..30).collect());
    c.set_adapter(a.clone(), None).unwrap();
    m.set_adapter(a, None).unwrap();
    let batches: Vec<Vec<Row>> = (0..20)
        .map(|s| rows(49_152, &[24 + s % 7], s as u32))
        .collect();
    let lc = train(&mut c, &batches, 1e-3);
    let lm = train(&mut m, &batches, 1e-3);
    assert_losses_match("SmolLM2", &lm, &lc, 1e-4);
}

/// `loss_scale · Σ w·CE` of one batch under `params` (no gradients taken).
fn loss(model: &your_ai::engine::mlx::weights::Model, p: &Params, lay: &batch::Layout) -> f64 {
    let pending = step::forward_backward(
        model,
        p,
        lay,
        (1.0, 0),
        BlockByBlock,
        &mut Default::default(),
    )
    .unwrap();
    convert::scalar(&pending.weighted).unwrap()
}

/// MLX's LoRA dropout mask: about `p` of the entries dropped, the rest scaled by `1/(1 − p)`;
/// the same mask again for the same (seed, block, target), another for another block, target
/// or seed.
#[test]
fn mlx_dropout_masks_are_scaled_and_drawn_again_alike() {
    let _s = serial();
    use your_ai::engine::mlx::block::dropout;
    let x = Array::from_slice(&vec![1f32; 64 * 128], &[64, 128]);
    let host = |a: &Array| -> Vec<f32> {
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    };
    let m = host(&dropout(&x, 0.25, 5, 1, 2).unwrap());
    let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
    assert!((dropped - 0.25).abs() < 0.03, "dropped {dropped}");
    assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    assert_eq!(host(&dropout(&x, 0.25, 5, 1, 2).unwrap()), m);
    for other in [
        dropout(&x, 0.25, 5, 0, 2),
        dropout(&x, 0.25, 5, 1, 3),
        dropout(&x, 0.25, 6, 1, 2),
    ] {
        assert_ne!(host(&other.unwrap()), m);
    }
}

/// `--lora-dropout` on MLX through the engine: the run learns, and the same seed gives the
/// same losses again (the masks come from the micro-batch's seed, so a resume draws them
/// alike); without dropout the losses differ.
#[test]
fn mlx_dropout_runs_are_reproducible() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, None);
    let batches: Vec<Vec<Row>> = (0..10)
        .map(|s| rows(96, &[12, 10], (s % 2) as u32))
        .collect();
    let run = |dropout: Option<(f64, u64)>| -> Vec<f64> {
        let mut m = mlx_engine(spec, &o, 0);
        m.set_adapter(adapter(m.config(), vec![0, 1]), None)
            .unwrap();
        let mut losses = vec![];
        for (i, b) in batches.iter().enumerate() {
            let targets: usize = b.iter().map(Row::scored).sum();
            let batch = MicroBatchRows {
                rows: b,
                dropout: dropout.map(|(p, seed)| (p, seed + i as u64)),
                loss_scale: 1.0 / targets as f64,
            };
            let sums = m.accumulate(&batch, &mut Profile::default()).unwrap();
            m.clip_gradients(1.0).unwrap();
            m.update(1e-2).unwrap();
            losses.push(sums.ce / targets as f64);
        }
        losses
    };
    let (a, b, plain) = (run(Some((0.2, 3))), run(Some((0.2, 3))), run(None));
    assert_eq!(a, b, "the same seed, the same run");
    assert_ne!(a, plain, "dropout changes the run");
    assert!(a[8] < a[0] && a[9] < a[1], "the run learns: {a:?}");
}

#[test]
fn mlx_gradients_match_finite_differences_for_every_lora_target() {
    let _s = serial();
    let dir = tiny_dir();
    let (model, all) = tiny_mlx(dir.path(), DType::F32);
    let some = partial(all.clone(), 1, &[Target::Q, Target::V, Target::Gate]);
    // With LoRA dropout too: the recompute in the backward draws the forward's masks again.
    // And with pairs on some targets of one block.
    for (a, dropout) in [
        (&all, None),
        (&all, Some((0.3, 11))),
        (&some, Some((0.3, 11))),
    ] {
        let mut p = Params::from_adapter(a).unwrap();
        let mut lay = batch::layout(&rows(96, &[11, 7], 3), &model.cfg).unwrap();
        lay.dropout = dropout;
        let pending = step::forward_backward(
            &model,
            &p,
            &lay,
            (1.0, 0),
            BlockByBlock,
            &mut Default::default(),
        )
        .unwrap();
        let grads: Vec<Vec<f32>> = p
            .split(&pending.grad)
            .unwrap()
            .iter()
            .map(|g| {
                convert::to_tensor(g)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let names: Vec<String> = a
            .iter()
            .flat_map(|(l, t, _)| [format!("{l}.{t:?}.A"), format!("{l}.{t:?}.B")])
            .collect();
        let tensors = p.tensors();
        assert_eq!(grads.len(), tensors.len());
        let h = 1e-2f32;
        for (i, g) in grads.iter().enumerate() {
            // The element with the largest gradient: finite differences in f32 resolve it best.
            let (j, &gj) = g
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                .unwrap();
            assert!(gj.abs() > 1e-5, "{}: no gradient", names[i]);
            let base = convert::to_tensor(&tensors[i]).unwrap();
            let shape: Vec<i32> = base.dims().iter().map(|&d| d as i32).collect();
            let v: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
            let mut at = |delta: f32| {
                let mut w = v.clone();
                w[j] += delta;
                let mut ts = tensors.clone();
                ts[i] = Array::from_slice(&w, &shape);
                p.set_tensors(&ts).unwrap();
                loss(&model, &p, &lay)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            p.set_tensors(&tensors).unwrap();
            let rel = (gj as f64 - fd).abs() / fd.abs().max(1e-4);
            assert!(
                rel < 3e-2,
                "{}[{j}] (dropout {dropout:?}): MLX {gj} vs finite differences {fd}",
                names[i]
            );
        }
    }
}

#[test]
fn mlx_resume_from_its_saved_state_is_exact() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, None);
    let batches: Vec<Vec<Row>> = (0..8).map(|s| rows(96, &[12, 9], s)).collect();
    let a = {
        let m = load(spec, &o, None).unwrap().model;
        adapter(&m.cfg, vec![0, 1])
    };
    let mut whole = mlx_engine(spec, &o, 0);
    whole.set_adapter(a.clone(), None).unwrap();
    let straight = train(&mut whole, &batches, 1e-2);

    let mut first = mlx_engine(spec, &o, 0);
    first.set_adapter(a, None).unwrap();
    let mut resumed = train(&mut first, &batches[..4], 1e-2);
    // What a checkpoint holds crosses the seam on the host; a new engine takes it.
    let (saved, opt) = (first.adapter().unwrap(), first.optimizer_state().unwrap());
    drop(first);
    let mut second = mlx_engine(spec, &o, 0);
    // Moments that do not fit the adapter tensor for tensor (here A's and B's swapped: the same
    // number of values) are refused, not taken into the wrong places.
    let mut swapped = opt.clone();
    swapped.m.swap(0, 1);
    let err = second
        .set_adapter(saved.clone(), Some(swapped))
        .expect_err("misplaced moments are refused")
        .to_string();
    assert!(err.contains("another adapter"), "{err}");
    second.set_adapter(saved, Some(opt)).unwrap();
    resumed.extend(train(&mut second, &batches[4..], 1e-2));
    assert_eq!(
        resumed, straight,
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn mlx_quantize_4_learns() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::F32, Some(QuantBits::parse(4).unwrap()));
    let batch = rows(96, &[16, 16], 1);
    // With each block recomputed, and with both keeping their products (whose gradient goes
    // through the quantized weight's transpose product).
    let runs: Vec<Vec<f64>> = [0, 2]
        .into_iter()
        .map(|keep| {
            let mut m = mlx_engine(spec, &o, keep);
            m.set_adapter(adapter(m.config(), vec![0, 1]), None)
                .unwrap();
            train(&mut m, &vec![batch.clone(); 20], 2e-2)
        })
        .collect();
    let losses = &runs[0];
    assert!(
        losses[19] < 0.8 * losses[0],
        "--quantize 4 does not learn: {losses:?}"
    );
    assert_losses_match("kept products, --quantize 4", &runs[1], losses, 1e-5);
}

/// MLX 0.32's primitives that Metal or its CUDA backend cannot run (`eval_gpu` throws: the
/// linear-algebra factorizations, `Load`, point-to-point `Send`/`Recv`), from
/// `mlx/backend/{metal,cuda}/primitives.cpp`.
const NOT_ON_GPU: [&str; 10] = [
    "Load", "LUF", "QRF", "SVD", "Inverse", "Cholesky", "Eig", "Eigh", "Send", "Recv",
];

#[test]
fn mlx_bf16_run_holds_no_f64_array() {
    let _s = serial();
    let dir = tiny_dir();
    let spec = dir.path().to_str().unwrap();
    let o = opts(DType::BF16, None);
    let (model, a) = tiny_mlx(dir.path(), DType::BF16);
    let p = Params::from_adapter(&a).unwrap();
    let mut lay = batch::layout(&packed_rows(96, &[5, 7, 9], 5, 24), &model.cfg).unwrap();
    lay.dropout = Some((0.1, 3));
    assert!(
        lay.rope.is_some(),
        "the strict run covers packed rows' RoPE, and LoRA dropout"
    );
    // Left as one lazy graph, so that the printout below holds every op of the step.
    let pending = step::forward_backward(
        &model,
        &p,
        &lay,
        (1.0, 0),
        Deferred,
        &mut Default::default(),
    )
    .unwrap();
    let mut held: Vec<(&str, Dtype)> = vec![
        ("embed", model.embed.dtype()),
        ("head", model.head.dtype()),
        ("norm", model.norm.dtype()),
        ("loss", pending.ce.dtype()),
    ];
    for b in &model.blocks {
        held.push(("input norm", b.input_norm.dtype()));
    }
    for g in &pending.grad {
        held.push(("gradient", g.dtype()));
    }
    for (what, d) in &held {
        assert_ne!(*d, Dtype::Float64, "{what} is f64");
    }
    // Every array of the step's graph (forward, head, recompute, backward): Metal has no f64.
    let graph = graph::print(&pending.outputs().collect::<Vec<_>>()).unwrap();
    assert!(
        graph.contains("bfloat16") && graph.contains("float32"),
        "the printout names dtypes: {}",
        &graph[..graph.len().min(2000)]
    );
    let f64_lines: Vec<&str> = graph.lines().filter(|l| l.contains("float64")).collect();
    assert!(f64_lines.is_empty(), "f64 in the bf16 step: {f64_lines:?}");
    // Nor any primitive without a GPU implementation. On this CPU, MLX's fast ops (rms_norm,
    // rope, attention) are built from these same primitives; on a GPU they are fused ones
    // that both backends have.
    let ops = graph::census(&graph);
    assert!(
        ops.contains_key("Matmul") && ops.contains_key("RandomBits"),
        "the printout names each node's primitive first: {ops:?}"
    );
    let lacking: Vec<&&str> = NOT_ON_GPU
        .iter()
        .filter(|p| ops.contains_key(**p))
        .collect();
    assert!(
        lacking.is_empty(),
        "the step uses {lacking:?}, which a GPU backend lacks"
    );
    assert_eq!(model.embed.dtype(), Dtype::Bfloat16);
    assert!(pending.grad.iter().all(|g| g.dtype() == Dtype::Float32));
    // And the bf16 run trains through the engine.
    let mut m = mlx_engine(spec, &o, 0);
    m.set_adapter(a, None).unwrap();
    let losses = train(&mut m, &vec![rows(96, &[16, 16], 1); 10], 2e-2);
    assert!(
        losses.iter().all(|l| l.is_finite()) && losses[9] < losses[0],
        "{losses:?}"
    );
}

/// A GGUF's Q4_0, Q4_1 and Q8_0 blocks become MLX's affine quantization block for block: MLX's
/// dequantization of each block linear (joined by input: its targets' blocks in order) equals
/// candle's dequantization of the blocks, exactly, whichever width `--quantize` asks for (a
/// Q4_1 file under `--quantize 8` was quantized again, onto another grid).
#[test]
fn mlx_holds_a_gguf_s_blocks_exactly() {
    use candle_core::quantized::GgmlDType;
    use your_ai::engine::mlx::weights::{Linear, Model, GROUP};
    let _s = serial();
    let tmp = tempfile::tempdir().unwrap();
    let spec = common::TinySpec::default();
    let both = [QuantBits::Four, QuantBits::Eight];
    let cases = [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0]
        .into_iter()
        .flat_map(|stored| both.map(|bits| (stored, bits)));
    for (stored, bits) in cases {
        let path = tmp.path().join(format!("m-{stored:?}-{bits:?}.gguf"));
        common::write_gguf(
            &path,
            &spec,
            &common::tiny_weights(&spec, 3),
            stored,
            "llama",
        );
        let llama = load(path.to_str().unwrap(), &opts(DType::F32, Some(bits)), None)
            .unwrap()
            .model;
        // Each joined linear's weights: its targets' rows in order.
        let dense: Vec<Vec<f32>> = llama
            .blocks
            .iter()
            .flat_map(|b| {
                let l = b.linears();
                Target::BY_INPUT.map(|g| {
                    g.flat_map(|t| {
                        l[t].weight
                            .dense(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    })
                    .collect()
                })
            })
            .collect();
        let model = Model::from_llama(llama, Dtype::Float32, Some(bits.bits() as i32)).unwrap();
        assert_eq!(dense.len(), 4 * model.blocks.len());
        let held = model.blocks.iter().flat_map(|b| b.linears.iter());
        for (i, (lin, want)) in held.zip(&dense).enumerate() {
            let Linear::Quantized {
                w,
                scales,
                biases,
                bits,
                ..
            } = lin
            else {
                panic!("{stored:?}: linear {i} is not quantized");
            };
            let got = mlx_rs::ops::dequantize(w, scales, biases, GROUP, *bits).unwrap();
            got.eval().unwrap();
            let differ = got
                .as_slice::<f32>()
                .iter()
                .zip(want)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differ, 0,
                "{stored:?} at {bits:?}: linear {i}: {differ} weights differ"
            );
        }
    }
}
