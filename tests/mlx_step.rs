//! The MLX engine's step as the engine evaluates it, on MLX's CPU backend: each part it returns
//! computed (block by block, or pipelined, a block queued while the one before computes), the
//! same gradients whichever way, and blocks keeping their frozen products giving the
//! recompute's loss and gradients. Built only with the `mlx` feature.
#![cfg(feature = "mlx")]

mod common;

use candle_core::DType;
use common::mlx::*;
use mlx_rs::Array;
use your_ai::engine::mlx::step::Evaluation::{BlockByBlock, Deferred, Pipelined};
use your_ai::engine::mlx::{batch, convert, graph, params::Params, step};
use your_ai::engine::Profile;

/// `a`'s values on the host, flattened (f32).
fn host(a: &Array) -> Vec<f32> {
    convert::to_tensor(a)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Each of the gradients `got` within `rel` of its largest entry in `want` (none all zero).
fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: gradient count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: gradient {i} is zero");
        let worst = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= rel * scale,
            "{what}: gradient {i} differs by {worst} (scale {scale})"
        );
    }
}

/// Whether MLX has computed `a` (no graph left to run for it).
fn computed(a: &Array) -> bool {
    let mut res = false;
    // SAFETY: `a` is a live array; the call only reads its status into `res`.
    let rc = unsafe { mlx_sys::_mlx_array_is_available(&mut res, a.as_ptr()) };
    assert_eq!(rc, 0, "mlx_array_is_available failed");
    res
}

/// Training computes the step block by block: each part the step functions return is already
/// computed, and the phases of `--profile` are timed. One evaluation of the whole step held
/// nearly every intermediate at once on MLX's CUDA backend (docs/gpu.md); `Deferred` keeps that
/// one graph, for inspection, and leaves everything uncomputed. `Pipelined` (the next block
/// built while the one before computes) returns its parts computed too, with the same
/// gradients bit for bit.
#[test]
fn mlx_the_step_is_computed_block_by_block() {
    let _s = serial();
    let dir = tiny_dir();
    let (model, a) = tiny_mlx(dir.path(), DType::F32);
    let p = Params::from_adapter(&a).unwrap();
    let low = step::lowered(&model, &p).unwrap();
    let lay = batch::layout(&rows(96, &[11, 7], 3), &model.cfg).unwrap();
    let mut results: Vec<Vec<Vec<f32>>> = vec![];
    for (mode, now) in [(BlockByBlock, true), (Pipelined, true), (Deferred, false)] {
        let (x, inputs) = step::forward(&model, Some(&low), &lay, 0, mode).unwrap();
        assert_eq!(inputs.len(), 2);
        for (i, v) in inputs.iter().map(|s| &s.input).chain([&x]).enumerate() {
            assert_eq!(computed(v), now, "{mode:?}: forward output {i}");
        }
        let coef = vec![1.0f32; lay.target_rows.len()];
        let (dx, ce, weighted) = step::head_backward(&model, &x, &lay, &coef, mode).unwrap();
        for v in [&dx, &ce, &weighted] {
            assert_eq!(computed(v), now, "{mode:?}: head");
        }
        let grads = step::backward(&model, &low, &lay, inputs, dx, mode).unwrap();
        // A and B of each joined linear: four a block.
        assert_eq!(grads.len(), 2 * 4 * model.blocks.len());
        for g in &grads {
            assert_eq!(computed(g), now, "{mode:?}: a block's gradient");
        }
        results.push(grads.iter().map(host).collect());
    }
    assert_eq!(results[1], results[0], "pipelined gradients differ");
    assert_eq!(results[2], results[0], "deferred gradients differ");
    let mut profile = Profile::default();
    step::forward_backward(&model, &p, &lay, (1.0, 0), BlockByBlock, &mut profile).unwrap();
    for (name, d) in [
        ("forward", profile.forward),
        ("head", profile.head),
        ("backward", profile.backward),
    ] {
        assert!(d > std::time::Duration::ZERO, "{name} not timed");
    }
}

/// A block that keeps its frozen products from the forward (`--keep-activations`) is
/// differentiated on them, not on a recompute: the loss and every LoRA gradient are those of
/// the recompute (with LoRA dropout too), and only the kept blocks hold products, one a joined
/// linear (four).
#[test]
fn mlx_kept_products_give_the_recompute_s_gradients() {
    let _s = serial();
    let dir = tiny_dir();
    let (model, a) = tiny_mlx(dir.path(), DType::F32);
    let p = Params::from_adapter(&a).unwrap();
    let all = |v: &[Array]| -> Vec<Vec<f32>> { v.iter().map(host).collect() };
    for dropout in [None, Some((0.3, 11))] {
        let mut lay = batch::layout(&rows(96, &[11, 7], 3), &model.cfg).unwrap();
        lay.dropout = dropout;
        let low = step::lowered(&model, &p).unwrap();
        let (_, saved) = step::forward(&model, Some(&low), &lay, 1, BlockByBlock).unwrap();
        let held: Vec<usize> = saved.iter().map(|s| s.products.len()).collect();
        assert_eq!(held, [0, 4], "the top block keeps its products");
        let step = |keep| {
            step::forward_backward(
                &model,
                &p,
                &lay,
                (1.0, keep),
                BlockByBlock,
                &mut Default::default(),
            )
            .unwrap()
        };
        let recomputed = step(0);
        let (r_loss, r_grads) = (
            convert::scalar(&recomputed.weighted).unwrap(),
            all(&p.split(&recomputed.grad).unwrap()),
        );
        for keep in [1, 2] {
            let kept = step(keep);
            assert_eq!(
                convert::scalar(&kept.weighted).unwrap(),
                r_loss,
                "{dropout:?} keep {keep}"
            );
            let kept = all(&p.split(&kept.grad).unwrap());
            assert_close(&kept, &r_grads, 1e-5, &format!("{dropout:?} keep {keep}"));
        }
    }
}

/// A block's linears that share an input are one product with one low-rank term (q, k and v;
/// o; gate and up; down): four `addmm`s a block, where each of seven linears had its own, and
/// four thin products `x Aᵀ` in the forward. With LoRA dropout each target draws its own mask,
/// so the group's thin products are one per target again (seven), joined before the `addmm`.
#[test]
fn mlx_linears_sharing_an_input_are_one_product() {
    let _s = serial();
    let dir = tiny_dir();
    let (model, a) = tiny_mlx(dir.path(), DType::BF16);
    let p = Params::from_adapter(&a).unwrap();
    let low = step::lowered(&model, &p).unwrap();
    let blocks = model.blocks.len();
    for dropout in [None, Some((0.2, 5))] {
        let mut lay = batch::layout(&rows(96, &[11, 7], 3), &model.cfg).unwrap();
        lay.dropout = dropout;
        let count = |params| {
            let (x, _) = step::forward(&model, params, &lay, 0, Deferred).unwrap();
            let nodes = graph::census(&graph::print(&[&x]).unwrap());
            let get = |k: &str| nodes.get(k).copied().unwrap_or(0);
            (get("Matmul"), get("AddMM"))
        };
        let (plain, none) = count(None);
        assert_eq!(none, 0);
        let (adapted, addmm) = count(Some(&low));
        assert_eq!(addmm, 4 * blocks, "{dropout:?}");
        let thin = if dropout.is_some() { 7 } else { 4 };
        assert_eq!(adapted - plain, thin * blocks, "{dropout:?}");
    }
}

/// The LoRA scale costs the step one multiply (folded into the A matrices), and one on the way
/// back, whatever the number of blocks and targets: scaled inside each block, an `addmm`'s
/// vector-Jacobian product multiplied each `[rows, out]` cotangent by it, twice a target. (With
/// the block's backward compiled those multiplies would be fused out of this count; a step
/// that stopped folding the scale would lose the two counted here.)
#[test]
fn mlx_the_lora_scale_is_folded_into_a() {
    let _s = serial();
    let dir = tiny_dir();
    let (model, a) = tiny_mlx(dir.path(), DType::BF16);
    let lay = batch::layout(&rows(96, &[11, 7], 3), &model.cfg).unwrap();
    let multiplies = |alpha: f64| {
        let mut a = a.clone();
        a.cfg.alpha = alpha;
        let p = Params::from_adapter(&a).unwrap();
        let pending = step::forward_backward(
            &model,
            &p,
            &lay,
            (1.0, 0),
            Deferred,
            &mut Profile::default(),
        )
        .unwrap();
        let text = graph::print(&pending.outputs().collect::<Vec<_>>()).unwrap();
        graph::census(&text).get("Multiply").copied().unwrap_or(0)
    };
    // Rank 4: alpha 4 is a scale of 1 (nothing to fold), alpha 8 a scale of 2.
    let (one, two) = (multiplies(4.0), multiplies(8.0));
    assert_eq!(two, one + 2, "scale 1: {one} multiplies; scale 2: {two}");
}

/// A block's compiled backward (its recompute and vector-Jacobian product traced once, the
/// element-wise chains fused) gives MLX's autograd's gradients, in f32 and bf16, on plain and
/// packed rows (a mask and RoPE tables as inputs), recomputing its frozen products or keeping
/// them, for each block; and called again on another micro-batch of the same shape (other
/// tokens, masks, RoPE tables, kept products, adapter and output gradient), its trace computes
/// with those, not the first call's: nothing that changes between steps is baked into it.
#[test]
fn mlx_a_compiled_block_backward_matches_autograd() {
    use mlx_rs::transforms::fallible_vjp;
    use your_ai::engine::mlx::block::{self, Products};
    use your_ai::engine::mlx::{compiled, lowered::BlockLora};
    let _s = serial();
    assert!(
        compiled::enabled(),
        "YOUR_AI_MLX_COMPILE=0 would test autograd against itself"
    );
    let dir = tiny_dir();
    for dtype in [DType::F32, DType::BF16] {
        let (model, a) = tiny_mlx(dir.path(), dtype);
        let p = Params::from_adapter(&a).unwrap();
        let [pa, pb] = &p.banks;
        let other = p
            .with([
                pa.multiply(Array::from_f32(1.3)).unwrap(),
                pb.multiply(Array::from_f32(-0.7)).unwrap(),
            ])
            .unwrap();
        let adapters = [
            step::lowered(&model, &p).unwrap(),
            step::lowered(&model, &other).unwrap(),
        ];
        let layout = |rows: Vec<_>| batch::layout(&rows, &model.cfg).unwrap();
        let plain = [layout(rows(96, &[11, 7], 3)), layout(rows(96, &[11, 7], 4))];
        let packed = [
            layout(packed_rows(96, &[5, 7, 9], 5, 24)),
            layout(packed_rows(96, &[9, 4, 8], 6, 24)),
        ];
        assert!(packed.iter().all(|l| l.mask.is_some() && l.rope.is_some()));
        assert_eq!((packed[0].b, packed[0].t), (packed[1].b, packed[1].t));
        for (name, lays) in [("plain", &plain), ("packed", &packed)] {
            for keep in [0, 2] {
                for call in 0..2 {
                    let (p, lay) = (&adapters[call], &lays[call]);
                    let (_, mut saved) =
                        step::forward(&model, Some(p), lay, keep, BlockByBlock).unwrap();
                    let rows = lay.rows();
                    for l in (0..model.blocks.len()).rev() {
                        let block = saved.pop().unwrap();
                        let products = match block.products.is_empty() {
                            true => Products::Compute,
                            false => Products::Kept(&block.products),
                        };
                        let present = p.present(l);
                        let dx = block
                            .input
                            .multiply(Array::from_f32(0.5 + call as f32))
                            .unwrap();
                        let got = compiled::block_backward(
                            &model,
                            l,
                            block.input.clone(),
                            p.block_tensors(l),
                            &dx,
                            (present, p.rank()),
                            &rows,
                            products,
                        )
                        .unwrap();
                        let f = |args: &[Array]| {
                            let lora = BlockLora::unflatten(present, p.rank(), &args[1..]);
                            let (out, _) =
                                block::forward(&model, l, &args[0], &lora, &rows, products)?;
                            Ok(vec![out])
                        };
                        let mut primals = vec![block.input.clone()];
                        primals.extend(p.block_tensors(l));
                        let (_, want) =
                            fallible_vjp(f, &primals, std::slice::from_ref(&dx)).unwrap();
                        assert_eq!(got.len(), want.len());
                        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                        for (i, (c, r)) in got.iter().zip(&want).enumerate() {
                            let (c, r) = (host(c), host(r));
                            let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                            assert!(scale > 0.0, "gradient {i} is zero");
                            let worst = c
                                .iter()
                                .zip(&r)
                                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                            assert!(
                                worst <= tol * scale,
                                "{dtype:?} {name} keep {keep} call {call} block {l}: gradient \
                                 {i} differs by {worst} (scale {scale})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Quantized linears multiply as dense copies made for each product (MLX's CPU and CUDA
/// backends: `weights::dequantizes`) or with MLX's quantized matmul (Metal): the same loss and
/// LoRA gradients either way, recomputing the blocks or keeping their products (whose gradient
/// is the quantized weight's `dY W`), and no quantized product left in the dense step's graph.
#[test]
fn mlx_quantized_linears_multiply_alike_dense_or_packed() {
    use your_ai::engine::mlx::weights::Model;
    use your_ai::model::quantized::QuantBits;
    let _s = serial();
    let dir = tiny_dir();
    let o = opts(DType::F32, Some(QuantBits::parse(4).unwrap()));
    let llama = your_ai::model::load(dir.path().to_str().unwrap(), &o, None)
        .unwrap()
        .model;
    let a = adapter(&llama.cfg, vec![0, 1]);
    let model = Model::from_llama(llama, mlx_rs::Dtype::Float32, Some(4)).unwrap();
    let p = Params::from_adapter(&a).unwrap();
    let lay = batch::layout(&rows(96, &[11, 7], 3), &model.cfg).unwrap();
    let all = |v: &[Array]| -> Vec<Vec<f32>> { v.iter().map(host).collect() };
    for keep in [0, 2] {
        let run = |dense: bool| {
            let m = model.clone().with_dense_products(dense);
            let mode = (1.0, keep);
            let pending =
                step::forward_backward(&m, &p, &lay, mode, Deferred, &mut Profile::default())
                    .unwrap();
            let text = graph::print(&pending.outputs().collect::<Vec<_>>()).unwrap();
            let quantized = graph::census(&text)
                .get("QuantizedMatmul")
                .copied()
                .unwrap_or(0);
            let done =
                step::forward_backward(&m, &p, &lay, mode, BlockByBlock, &mut Profile::default())
                    .unwrap();
            let loss = convert::scalar(&done.weighted).unwrap();
            (quantized, loss, all(&p.split(&done.grad).unwrap()))
        };
        let (packed_ops, packed_loss, packed) = run(false);
        let (dense_ops, dense_loss, dense) = run(true);
        assert!(
            packed_ops > 0,
            "keep {keep}: no quantized product when packed"
        );
        assert_eq!(
            dense_ops, 0,
            "keep {keep}: a quantized product left when dense"
        );
        assert!(
            (dense_loss - packed_loss).abs() <= 1e-5 * packed_loss.abs(),
            "keep {keep}: loss {dense_loss} dense, {packed_loss} packed"
        );
        assert_close(&dense, &packed, 1e-4, &format!("keep {keep}"));
    }
}
