//! What the MLX engine relies on, checked on the MLX this build links (MLX's CPU backend here):
//! autograd against finite differences, gradients through the fused ops, quantized matmul and
//! its input gradient, and the allocator's memory functions.

use crate::runtime::memory::mlx as mem;
use mlx_rs::error::Exception;
use mlx_rs::fast::{rms_norm, rope, scaled_dot_product_attention, ScaledDotProductAttentionMask};
use mlx_rs::ops::{dequantize, quantize, quantized_matmul};
use mlx_rs::transforms::{fallible_vjp, value_and_grad_with_argnums};
use mlx_rs::Array;

type R<T> = Result<T, Exception>;

/// MLX's state (its allocator, its limits, its default stream) is the process's: tests that use
/// it run one at a time.
pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A deterministic pseudo-random vector in [-scale, scale) (no RNG dependency in the checks).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn array(shape: &[i32], seed: u64, scale: f32) -> Array {
    let n = shape.iter().product::<i32>() as usize;
    Array::from_slice(&values(n, seed, scale), shape)
}

fn host(a: &Array) -> R<Vec<f32>> {
    a.eval()?;
    Ok(a.as_slice::<f32>().to_vec())
}

fn scalar(a: &Array) -> R<f32> {
    a.eval()?;
    Ok(a.item_cast::<f32>())
}

/// Central differences of `f` with respect to `inputs[which]`, at the flat positions `at`.
fn finite_differences(
    f: &mut dyn FnMut(&[Array]) -> R<f32>,
    inputs: &[Array],
    which: usize,
    at: &[usize],
    h: f32,
) -> R<Vec<f32>> {
    let base = host(&inputs[which])?;
    let shape = inputs[which].shape().to_vec();
    let mut out = vec![];
    for &i in at {
        let mut eval_at = |delta: f32| -> R<f32> {
            let mut v = base.clone();
            v[i] += delta;
            let mut args = inputs.to_vec();
            args[which] = Array::from_slice(&v, &shape);
            f(&args)
        };
        out.push((eval_at(h)? - eval_at(-h)?) / (2.0 * h));
    }
    Ok(out)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= abs + rel * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn positions(n: usize) -> Vec<usize> {
    (0..n).step_by((n / 7).max(1)).collect()
}

#[test]
fn value_and_grad_matches_finite_differences() -> R<()> {
    let _serial = serial();
    // f(x, w) = Σ tanh(x·W)² over a small matmul: a gradient through a product and a
    // nonlinearity, in both arguments.
    let f = |args: &[Array]| -> R<Array> {
        let y = mlx_rs::ops::tanh(args[0].matmul(&args[1])?)?;
        y.square()?.sum(None)
    };
    let inputs = [array(&[3, 5], 1, 1.0), array(&[5, 4], 2, 0.7)];
    let mut vg =
        value_and_grad_with_argnums(|a: &[Array]| -> R<Vec<Array>> { Ok(vec![f(a)?]) }, &[0, 1]);
    let (v, grads) = vg(&inputs)?;
    assert_eq!(grads.len(), 2);
    let mut value = |a: &[Array]| scalar(&f(a)?);
    assert_eq!(scalar(&v[0])?, value(&inputs)?);
    for (which, grad) in grads.iter().enumerate() {
        let n = inputs[which].size();
        let at = positions(n);
        let fd = finite_differences(&mut value, &inputs, which, &at, 1e-2)?;
        let g = host(grad)?;
        let got: Vec<f32> = at.iter().map(|&i| g[i]).collect();
        assert_close(&format!("d/d input {which}"), &got, &fd, 2e-2, 2e-3);
    }
    Ok(())
}

/// A small attention block on the fused ops: RMSNorm, RoPE, scaled-dot-product attention with
/// grouped KV heads and a causal mask. Inputs: x `[1, T, H]`, the norm weight `[H]`, and the
/// query, key and value projections.
fn fused_block(args: &[Array], heads: i32, kv_heads: i32, d: i32) -> R<Array> {
    let (x, norm, wq, wk, wv) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
    let t = x.shape()[1];
    let h = rms_norm(x, Some(norm), 1e-5)?;
    let split = |w: &Array, n: i32| -> R<Array> {
        h.matmul(w)?
            .reshape(&[1, t, n, d])?
            .transpose_axes(&[0, 2, 1, 3])
    };
    let q = rope(split(wq, heads)?, d, false, 10000.0, 1.0, 0, None)?;
    let k = rope(split(wk, kv_heads)?, d, false, 10000.0, 1.0, 0, None)?;
    let v = split(wv, kv_heads)?;
    let scale = 1.0 / (d as f32).sqrt();
    let o =
        scaled_dot_product_attention(q, k, v, scale, ScaledDotProductAttentionMask::Causal, None)?;
    // A fixed, uneven weighting of the output, so every element's gradient differs.
    let w = array(o.shape(), 99, 1.0);
    o.multiply(&w)?.sum(None)
}

#[test]
fn gradients_flow_through_rms_norm_rope_and_attention() -> R<()> {
    let _serial = serial();
    let (heads, kv_heads, d, t, hidden) = (4, 2, 8, 6, 16);
    let inputs = [
        array(&[1, t, hidden], 3, 1.0),
        array(&[hidden], 4, 0.5).add(Array::from_f32(1.0))?,
        array(&[hidden, heads * d], 5, 0.3),
        array(&[hidden, kv_heads * d], 6, 0.3),
        array(&[hidden, kv_heads * d], 7, 0.3),
    ];
    let f = move |a: &[Array]| -> R<Vec<Array>> { Ok(vec![fused_block(a, heads, kv_heads, d)?]) };
    let (_, grads) = fallible_vjp(f, &inputs, &[Array::from_f32(1.0)])?;
    let mut value = |a: &[Array]| scalar(&fused_block(a, heads, kv_heads, d)?);
    for (which, grad) in grads.iter().enumerate() {
        let g = host(grad)?;
        assert!(
            g.iter().any(|v| v.abs() > 1e-4) && g.iter().all(|v| v.is_finite()),
            "input {which}: the gradient is zero or not finite: the fused op dropped it"
        );
        let at = positions(g.len());
        let fd = finite_differences(&mut value, &inputs, which, &at, 1e-2)?;
        let got: Vec<f32> = at.iter().map(|&i| g[i]).collect();
        assert_close(&format!("d/d input {which}"), &got, &fd, 3e-2, 3e-3);
    }
    Ok(())
}

#[test]
fn quantized_matmul_matches_the_dequantized_product_and_has_an_input_gradient() -> R<()> {
    let _serial = serial();
    let (rows, inp, out) = (5, 64, 24);
    let w = array(&[out, inp], 8, 0.5);
    let x = array(&[rows, inp], 9, 1.0);
    for (bits, group) in [(4, 32), (4, 64), (8, 32), (8, 64)] {
        let (wq, scales, biases) = quantize(&w, group, bits)?;
        let dense = dequantize(&wq, &scales, &biases, group, bits)?;
        // The quantization is close to the weight (a coarse check that the formats agree).
        let err = host(&dense.subtract(&w)?.abs()?.max(None)?)?[0];
        let step = if bits == 4 { 1.0 / 15.0 } else { 1.0 / 255.0 };
        assert!(err <= step * 1.01, "{bits}-bit error {err}");
        let qmm = |a: &[Array]| -> R<Vec<Array>> {
            Ok(vec![quantized_matmul(
                &a[0], &wq, &scales, &biases, true, group, bits,
            )?])
        };
        let y = qmm(std::slice::from_ref(&x))?.remove(0);
        let want = x.matmul(dense.t())?;
        assert_close(
            &format!("{bits}-bit y"),
            &host(&y)?,
            &host(&want)?,
            1e-4,
            1e-4,
        );
        let dy = array(&[rows, out], 10, 1.0);
        let (_, dx) = fallible_vjp(qmm, std::slice::from_ref(&x), std::slice::from_ref(&dy))?;
        let want_dx = dy.matmul(&dense)?;
        assert_close(
            &format!("{bits}-bit dx"),
            &host(&dx[0])?,
            &host(&want_dx)?,
            1e-4,
            1e-4,
        );
    }
    Ok(())
}

#[test]
fn memory_functions_report_and_limits_apply() -> R<()> {
    let _serial = serial();
    mem::clear_cache()?;
    mem::reset_peak()?;
    let before = mem::read()?;
    let big = mlx_rs::ops::ones::<f32>(&[1024, 1024])?.multiply(Array::from_f32(2.0))?;
    big.eval()?;
    let during = mem::read()?;
    assert!(
        during.active >= before.active + 4 * 1024 * 1024,
        "4 MiB live: {before:?} → {during:?}"
    );
    assert!(during.peak >= during.active);
    drop(big);
    let after = mem::read()?;
    assert!(after.active < during.active, "{during:?} → {after:?}");
    mem::clear_cache()?;
    assert_eq!(
        mem::read()?.cache,
        0,
        "the cache is empty after clear_cache"
    );

    let limits = mem::apply_budget(3_000_000_000, None)?;
    assert_eq!(mem::memory_limit()?, 3_000_000_000);
    assert_eq!(limits.cache, mem::cache_limit_for(3_000_000_000));
    // Setting it again reports the limit just set as the previous one.
    assert_eq!(
        mem::apply_budget(4_000_000_000, Some(1_000))?.previous_memory,
        3_000_000_000
    );
    mem::apply_budget(limits.previous_memory, None)?;
    Ok(())
}

#[test]
fn the_device_describes_its_memory() -> R<()> {
    let _s = serial();
    // MLX's CPU backend describes its device by name only, so a run plans against RAM.
    let sizes = mem::device_sizes()?;
    assert!(sizes
        .iter()
        .all(|(k, _)| k != "max_recommended_working_set_size"));
    let m = mem::device_memory();
    assert_eq!(m.total, crate::runtime::memory::total_ram());
    assert_eq!(m.kind, "RAM");
    Ok(())
}
