//! The training step's RoPE and attention on the projections' `[B·T, heads·d]` layout: the
//! fused CPU kernels where they apply (f32 on the CPU), else candle's composite ops on the
//! `[B, heads, T, d]` layout (other devices and dtypes; the f64 gradient tests run this path and
//! check it against autograd and finite differences).

use super::step::MicroBatch;
use crate::kernels::{self, Heads};
use candle_core::{Result, Tensor, D};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Nanoseconds spent in [`timed`] since the last [`take_time`].
static NANOS: AtomicU64 = AtomicU64::new(0);

/// Runs `f`, adding its time to the attention total (`train --profile` shows it).
pub fn timed<R>(f: impl FnOnce() -> R) -> R {
    let clock = Instant::now();
    let r = f();
    NANOS.fetch_add(clock.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// The attention time since the last call.
pub fn take_time() -> Duration {
    Duration::from_nanos(NANOS.swap(0, Ordering::Relaxed))
}

/// Batch and head sizes of one block's attention.
pub fn heads(model: &crate::model::Llama, mb: &MicroBatch) -> Result<Heads> {
    let (b, t) = mb.ids.dims2()?;
    let c = &model.cfg;
    Ok(Heads {
        b,
        t,
        nh: c.num_attention_heads,
        nkv: c.num_key_value_heads,
        d: c.head_dim,
    })
}

fn to_heads(x: &Tensor, h: Heads, n: usize) -> Result<Tensor> {
    x.reshape((h.b, h.t, n, h.d))?.transpose(1, 2)?.contiguous()
}

fn from_heads(x: &Tensor, h: Heads, n: usize) -> Result<Tensor> {
    x.transpose(1, 2)?.reshape((h.b * h.t, n * h.d))
}

/// RoPE on `x` (`[B·T, n·d]`), or its inverse (the backward: a rotation by the opposite angle).
pub fn rope(x: &Tensor, mb: &MicroBatch, h: Heads, n: usize, inverse: bool) -> Result<Tensor> {
    if let Some(done) = kernels::rope(x, &mb.cos, &mb.sin, h.t, h.d, inverse) {
        return done;
    }
    let sin = if inverse {
        mb.sin.neg()?
    } else {
        mb.sin.clone()
    };
    let y = candle_nn::rotary_emb::rope(&to_heads(x, h, n)?, &mb.cos, &sin)?;
    from_heads(&y, h, n)
}

/// `softmax(q kᵀ/√d + mask) v`: the probabilities `[B, nh, T, T]` (kept for the backward) and
/// the output `[B·T, nh·d]`.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mb: &MicroBatch,
    h: Heads,
) -> Result<(Tensor, Tensor)> {
    let scale = 1.0 / (h.d as f64).sqrt();
    if let Some(done) = kernels::attention(q, k, v, &mb.mask, h, scale as f32) {
        return done;
    }
    let Heads { b, t, nh, nkv, d } = h;
    let rep = nh / nkv;
    let (q, k, v) = (
        to_heads(q, h, nh)?,
        to_heads(k, h, nkv)?,
        to_heads(v, h, nkv)?,
    );
    // Query heads of one K/V group as rep·T rows: no K/V copies for GQA.
    let qg = q.reshape((b, nkv, rep * t, d))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?
        .reshape((b, nkv, rep, t, t))?
        .broadcast_add(&mb.mask.to_dtype(q.dtype())?)?
        .reshape((b, nkv, rep * t, t))?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    drop(scores);
    let out = probs.matmul(&v)?.reshape((b, nh, t, d))?;
    Ok((probs.reshape((b, nh, t, t))?, from_heads(&out, h, nh)?))
}

/// Gradients `(dq, dk, dv)` of [`forward`] given `dout` (`[B·T, nh·d]`), in q's, k's and v's
/// layouts.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    dout: &Tensor,
    mb: &MicroBatch,
    h: Heads,
) -> Result<(Tensor, Tensor, Tensor)> {
    let scale = 1.0 / (h.d as f64).sqrt();
    let fused = kernels::attention_backward(q, k, v, &mb.mask, probs, dout, h, scale as f32);
    if let Some(done) = fused {
        return done;
    }
    let Heads { b, t, nh, nkv, d } = h;
    let rep = nh / nkv;
    let group = |x: Tensor| x.reshape((b, nkv, rep * t, d));
    let qg = group(to_heads(q, h, nh)?)?;
    let (k, v) = (to_heads(k, h, nkv)?, to_heads(v, h, nkv)?);
    let dog = group(to_heads(dout, h, nh)?)?;
    let probs = probs.reshape((b, nkv, rep * t, t))?;
    let dv = probs.t()?.matmul(&dog)?;
    let dprobs = dog.matmul(&v.t()?)?;
    // Softmax backward: dS = P ⊙ (dP − Σⱼ dPⱼ Pⱼ), then the 1/√d scale.
    let rowdot = (&dprobs * &probs)?.sum_keepdim(D::Minus1)?;
    let dscores = ((&probs * dprobs.broadcast_sub(&rowdot)?)? * scale)?;
    drop(dprobs);
    let dq = dscores.matmul(&k)?.reshape((b, nh, t, d))?;
    let dk = dscores.t()?.matmul(&qg)?;
    Ok((
        from_heads(&dq, h, nh)?,
        from_heads(&dk, h, nkv)?,
        from_heads(&dv, h, nkv)?,
    ))
}
