//! Attention, forward and backward, in the two forms the block runs it in:
//!
//! - [`Sequences`] (training): whole sequences of a micro-batch on the projections' `[B·T,
//!   heads·d]` layout, RoPE included; the fused CPU kernels where they apply (f32 on the CPU),
//!   else candle's composite ops on the `[B, heads, T, d]` layout in query chunks (other
//!   devices and dtypes; the f64 gradient tests run this path and check it against autograd
//!   and finite differences). It keeps what its backward needs and times itself for
//!   `train --profile`.
//! - [`Cached`] (inference): new positions appended to a KV cache, with candle's fused RoPE and
//!   softmax. Grouped-query attention is computed without copying K/V per query head: the
//!   query heads of one group are laid out as extra rows against their shared K/V head.

use super::rope::{rope, rope_heads};
use super::{from_heads, row_chunks, to_heads, Heads};
use crate::kernels;
use candle_core::{DType, Result, Tensor, D};
use std::time::{Duration, Instant};

/// The attention step of a block, between the q/k/v projections and the output projection:
/// what differs between training and inference.
pub trait Attend {
    /// Rotates q or k (`[rows, n·d]`, `n` heads) to their positions, in the layout
    /// [`Attend::attend`] takes.
    fn rope(&self, x: &Tensor, n: usize) -> Result<Tensor>;

    /// Attention of the rotated `q`, `k` and of `v` (`[rows, nkv·d]`): the output `[rows,
    /// nh·d]` and, with `keep`, what the backward needs.
    fn attend(&mut self, q: Tensor, k: Tensor, v: Tensor, keep: bool) -> Result<Attended>;
}

/// Attention's output `[rows, nh·d]` and, when asked for, what its backward needs.
pub type Attended = (Tensor, Option<Saved>);

/// What attention's backward needs from its forward: the rotated queries `[B·T, nh·d]`, keys
/// and values `[B·T, nkv·d]`, and the probabilities or their log-sum-exp.
pub struct Saved {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub kept: Kept,
}

/// What the backward needs besides q, k, v and the output.
pub enum Kept {
    /// The probabilities `[B, nh, T, T]` (the fused CPU kernels keep them).
    Probs(Tensor),
    /// Each score row's log-sum-exp `[B, nkv, rep·T, 1]` in f32 (f64 for f64 models): the
    /// composite path recomputes the probabilities chunk by chunk from it.
    Lse(Tensor),
}

/// Training's attention over the whole sequences of a micro-batch.
pub struct Sequences<'a> {
    /// RoPE tables: `[T, d/2]`, or `[B, T, d/2]` when packed documents restart positions.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Additive mask, `[1, 1, 1, T, T]` or `[B, 1, 1, T, T]` ([`super::mask::batch`]).
    pub mask: &'a Tensor,
    pub heads: Heads,
    /// Time spent in attention proper (scores, softmax, weighted sum; forward and backward),
    /// for `train --profile`: it grows with the square of the length.
    pub time: Duration,
}

impl Attend for Sequences<'_> {
    fn rope(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        rope(x, self.cos, self.sin, self.heads, n, false)
    }

    fn attend(&mut self, q: Tensor, k: Tensor, v: Tensor, keep: bool) -> Result<Attended> {
        let clock = Instant::now();
        let done = self.forward(&q, &k, &v);
        self.time += clock.elapsed();
        let (kept, out) = done?;
        Ok((out, keep.then_some(Saved { q, k, v, kept })))
    }
}

impl Sequences<'_> {
    /// `softmax(q kᵀ/√d + mask) v`: what the backward keeps and the output `[B·T, nh·d]`.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Kept, Tensor)> {
        let h = self.heads;
        let scale = 1.0 / (h.d as f64).sqrt();
        if let Some(done) = kernels::attention(q, k, v, self.mask, h, scale as f32) {
            let (probs, out) = done?;
            return Ok((Kept::Probs(probs), out));
        }
        composite_forward(q, k, v, self.mask, h, composite_chunk_rows(h))
    }

    /// Gradients `(dq, dk, dv)` given the forward's `saved`, its output `out` and `dout`
    /// (`[B·T, nh·d]` each), in the projections' layouts: dq and dk before RoPE (its backward,
    /// a rotation by the opposite angle, included).
    pub fn backward(
        &mut self,
        saved: &Saved,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let clock = Instant::now();
        let grads = self.attention_backward(saved, out, dout);
        self.time += clock.elapsed();
        let (dq, dk, dv) = grads?;
        let h = self.heads;
        let dq = rope(&dq, self.cos, self.sin, h, h.nh, true)?;
        let dk = rope(&dk, self.cos, self.sin, h, h.nkv, true)?;
        Ok((dq, dk, dv))
    }

    fn attention_backward(
        &self,
        s: &Saved,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let h = self.heads;
        let scale = 1.0 / (h.d as f64).sqrt();
        if let Kept::Probs(probs) = &s.kept {
            let (q, k, v, mask) = (&s.q, &s.k, &s.v, self.mask);
            let fused = kernels::attention_backward(q, k, v, mask, probs, dout, h, scale as f32);
            if let Some(done) = fused {
                return done;
            }
        }
        let chunk = composite_chunk_rows(h);
        composite_backward(&s.q, &s.k, &s.v, &s.kept, out, dout, self.mask, h, chunk)
    }
}

/// Bytes one `[B, nh, rows, keys]` f32 temporary of the composite path may take: queries go
/// through in row chunks of this size, so no `[B, nh, T, T]` tensor exists (at Llama-8B
/// shapes and length 2048 those are 0.5 GB each, and the backward made four).
pub const COMPOSITE_CHUNK_BYTES: usize = 32 << 20;

/// Query rows per chunk of the composite path (at least 16, at most `t`).
pub fn composite_chunk_rows(h: Heads) -> usize {
    (COMPOSITE_CHUNK_BYTES / (4 * h.b * h.nh * h.t).max(1))
        .max(16)
        .min(h.t)
}

fn composite_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    h: Heads,
    chunk_rows: usize,
) -> Result<(Kept, Tensor)> {
    let scale = 1.0 / (h.d as f64).sqrt();
    let Heads { b, t, nh, nkv, d } = h;
    let rep = nh / nkv;
    let (qg, k, v) = grouped(q, k, v, h)?;
    let mut outs = vec![];
    let mut lses = vec![];
    for (c0, c) in row_chunks(t, chunk_rows) {
        let s = scores(&qg, &k, mask, h, c0, c, scale)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&sum)?.to_dtype(v.dtype())?;
        lses.push((max + sum.log()?)?.reshape((b, nkv, rep, c, 1))?);
        outs.push(
            p.matmul(&v.narrow(2, 0, c0 + c)?)?
                .reshape((b, nkv, rep, c, d))?,
        );
    }
    let out = Tensor::cat(&outs, 3)?.reshape((b, nh, t, d))?;
    let lse = Tensor::cat(&lses, 3)?.reshape((b, nkv, rep * t, 1))?;
    Ok((Kept::Lse(lse), from_heads(&out, h, nh)?))
}

/// Query heads of one K/V group as rep·T rows, `[B, nkv, rep·T, d]`, beside k and v as
/// `[B, nkv, T, d]`: no K/V copies for GQA.
fn grouped(q: &Tensor, k: &Tensor, v: &Tensor, h: Heads) -> Result<(Tensor, Tensor, Tensor)> {
    let qg = to_heads(q, h, h.nh)?.reshape((h.b, h.nkv, h.nh / h.nkv * h.t, h.d))?;
    Ok((qg, to_heads(k, h, h.nkv)?, to_heads(v, h, h.nkv)?))
}

/// Rows `c0..c0+c` of every query head of `x` (`[B, nkv, rep·T, d']`), as
/// `[B, nkv, rep·c, d']`.
fn rows(x: &Tensor, h: Heads, c0: usize, c: usize) -> Result<Tensor> {
    let rep = h.nh / h.nkv;
    let dd = x.dim(3)?;
    x.reshape((h.b, h.nkv, rep, h.t, dd))?
        .narrow(3, c0, c)?
        .contiguous()?
        .reshape((h.b, h.nkv, rep * c, dd))
}

/// Masked, scaled scores of query rows `c0..c0+c` against keys `0..c0+c`, `[B, nkv, rep·c,
/// c0+c]`, in the accumulation dtype. Our masks are causal (mask.rs), so later keys never count.
fn scores(
    qg: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    h: Heads,
    c0: usize,
    c: usize,
    scale: f64,
) -> Result<Tensor> {
    let rep = h.nh / h.nkv;
    let keys = c0 + c;
    let acc = acc_dtype(qg.dtype());
    let s = (rows(qg, h, c0, c)?
        .matmul(&k.narrow(2, 0, keys)?.t()?)?
        .to_dtype(acc)?
        * scale)?;
    let m = mask.narrow(3, c0, c)?.narrow(4, 0, keys)?.to_dtype(acc)?;
    s.reshape((h.b, h.nkv, rep, c, keys))?
        .broadcast_add(&m)?
        .reshape((h.b, h.nkv, rep * c, keys))
}

/// The softmax runs in f32 at least (f64 for f64 models, as the gradient tests use).
fn acc_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        dt
    } else {
        DType::F32
    }
}

#[allow(clippy::too_many_arguments)]
fn composite_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kept: &Kept,
    out: &Tensor,
    dout: &Tensor,
    mask: &Tensor,
    h: Heads,
    chunk_rows: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let scale = 1.0 / (h.d as f64).sqrt();
    let Heads { b, t, nh, nkv, d } = h;
    let rep = nh / nkv;
    let (qg, k, v) = grouped(q, k, v, h)?;
    let group =
        |x: &Tensor| -> Result<Tensor> { to_heads(x, h, nh)?.reshape((b, nkv, rep * t, d)) };
    let (dog, og) = (group(dout)?, group(out)?);
    let acc = acc_dtype(qg.dtype());
    let (mut dk, mut dv) = (k.zeros_like()?, v.zeros_like()?);
    let mut dqs = vec![];
    for (c0, c) in row_chunks(t, chunk_rows) {
        let keys = c0 + c;
        let p = match kept {
            Kept::Probs(probs) => rows(&probs.reshape((b, nkv, rep * t, t))?, h, c0, c)?
                .narrow(3, 0, keys)?
                .to_dtype(acc)?,
            Kept::Lse(lse) => scores(&qg, &k, mask, h, c0, c, scale)?
                .broadcast_sub(&rows(lse, h, c0, c)?)?
                .exp()?,
        };
        let (qc, doc) = (rows(&qg, h, c0, c)?, rows(&dog, h, c0, c)?);
        let (kc, vc) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?);
        // Softmax backward: dS = P ⊙ (dP − Σⱼ dPⱼ Pⱼ) with Σⱼ dPⱼ Pⱼ = dO · O, then 1/√d.
        let dp = doc.matmul(&vc.t()?)?.to_dtype(acc)?;
        let rowdot = (&doc * &rows(&og, h, c0, c)?)?
            .to_dtype(acc)?
            .sum_keepdim(D::Minus1)?;
        let ds = ((&p * dp.broadcast_sub(&rowdot)?)? * scale)?.to_dtype(qg.dtype())?;
        drop(dp);
        let p = p.to_dtype(qg.dtype())?;
        dv = dv.slice_assign(
            &[0..b, 0..nkv, 0..keys, 0..d],
            &(dv.narrow(2, 0, keys)? + p.t()?.matmul(&doc)?)?,
        )?;
        dk = dk.slice_assign(
            &[0..b, 0..nkv, 0..keys, 0..d],
            &(dk.narrow(2, 0, keys)? + ds.t()?.matmul(&qc)?)?,
        )?;
        dqs.push(ds.matmul(&kc)?.reshape((b, nkv, rep, c, d))?);
    }
    let dq = Tensor::cat(&dqs, 3)?.reshape((b, nh, t, d))?;
    Ok((
        from_heads(&dq, h, nh)?,
        from_heads(&dk, h, nkv)?,
        from_heads(&dv, h, nkv)?,
    ))
}

/// Inference's attention: `t` new positions of `b` sequences after those in one block's KV
/// cache, which it extends.
pub struct Cached<'a> {
    /// RoPE tables of the new positions, `[t, d/2]`.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Additive mask `[t, cached + t]` ([`super::mask::causal`]); `None`: every key is seen.
    pub mask: Option<&'a Tensor>,
    /// Keys and values of the positions before.
    pub cache: &'a mut Option<crate::model::llama::KvSlot>,
    /// The dtype the cache holds them in (`None`: as computed).
    pub store: Option<DType>,
    /// `t` here is the number of new positions.
    pub heads: Heads,
}

impl Attend for Cached<'_> {
    fn rope(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        rope_heads(&to_heads(x, self.heads, n)?, self.cos, self.sin, false)
    }

    fn attend(&mut self, q: Tensor, k: Tensor, v: Tensor, keep: bool) -> Result<Attended> {
        if keep {
            candle_core::bail!("inference attention keeps nothing for a backward");
        }
        let h = self.heads;
        let v = to_heads(&v, h, h.nkv)?;
        let (k, v) = crate::model::llama::KvSlot::append(self.cache, &k, &v, self.store)?;
        // One new position, every cached key in view: decoding's own kernel.
        if self.mask.is_none() {
            if let Some((kb, vb, len)) = self.cache.as_ref().map(|s| s.buffers()) {
                if let Some(out) = crate::kernels::attend_cached(&q, kb, vb, len, h.nkv) {
                    return Ok((from_heads(&out?, h, h.nh)?, None));
                }
            }
        }
        // A cache held in another dtype (f16 for f32 arithmetic) is widened for the GEMMs.
        let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
        let out = cached_attention(&q, &k, &v, self.mask, h.nkv)?;
        Ok((from_heads(&out, h, h.nh)?, None))
    }
}

/// Scaled dot-product attention with grouped K/V heads. `q` is `[b, nh, t, d]`, `k`/`v` are
/// `[b, nkv, T, d]`, `mask` is `[t, T]` additive. Softmax runs in f32.
fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    nkv: usize,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let total = k.dim(2)?;
    let rep = nh / nkv;
    let scale = 1.0 / (d as f64).sqrt();
    // Query heads of one group are consecutive: view them as rep·t rows against one K/V head.
    let qg = q.reshape((b, nkv, rep * t, d))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores
            .reshape((b, nkv, rep, t, total))?
            .broadcast_add(m)?
            .reshape((b, nkv, rep * t, total))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(v)?.reshape((b, nh, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Decoding's kernel (one query against the first `len` positions of K/V buffers) against
    /// the composite attention on the same positions, for grouped heads.
    #[test]
    fn the_decoding_kernel_equals_the_composite_attention() {
        let (nh, nkv, d, cap) = (6, 2, 16, 40);
        let f32s = |dims: &[usize], seed: u64| {
            let n: usize = dims.iter().product();
            rand((n, 1), seed)
                .to_dtype(DType::F32)
                .unwrap()
                .reshape(dims)
                .unwrap()
        };
        let q = f32s(&[1, nh, 1, d], 1);
        let (k, v) = (f32s(&[1, nkv, cap, d], 2), f32s(&[1, nkv, cap, d], 3));
        for len in [1, 7, cap] {
            let got = crate::kernels::attend_cached(&q, &k, &v, len, nkv)
                .expect("covered")
                .unwrap();
            let (kl, vl) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
            let want = cached_attention(
                &q,
                &kl.contiguous().unwrap(),
                &vl.contiguous().unwrap(),
                None,
                nkv,
            )
            .unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "len {len}: {diff}");
        }
        // Not covered: two new positions.
        let q2 = f32s(&[1, nh, 2, d], 4);
        assert!(crate::kernels::attend_cached(&q2, &k, &v, 3, nkv).is_none());
    }

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.0 * shape.1)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Causal masks: plain, and per sequence with two packed documents in the second one.
    fn masks(b: usize, t: usize) -> Vec<Tensor> {
        let mut plain = vec![f64::NEG_INFINITY; t * t];
        let mut packed = vec![f64::NEG_INFINITY; b * t * t];
        let split = t / 3;
        for i in 0..t {
            for j in 0..=i {
                plain[i * t + j] = 0.0;
                for s in 0..b {
                    if s == 0 || (j >= split) == (i >= split) {
                        packed[(s * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        vec![
            Tensor::from_vec(plain, (1, 1, 1, t, t), &Device::Cpu).unwrap(),
            Tensor::from_vec(packed, (b, 1, 1, t, t), &Device::Cpu).unwrap(),
        ]
    }

    /// Plain loops: the output and `Σ dout·out`-free gradients by the textbook formulas,
    /// one (sequence, head) at a time.
    #[allow(clippy::type_complexity)]
    fn reference(
        q: &[Vec<f64>],
        k: &[Vec<f64>],
        v: &[Vec<f64>],
        dout: &[Vec<f64>],
        mask: &[f64],
        h: Heads,
    ) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let Heads { b, t, nh, nkv, d } = h;
        let scale = 1.0 / (d as f64).sqrt();
        let zeros = |w: usize| vec![vec![0.0; w]; b * t];
        let (mut out, mut dq, mut dk, mut dv) =
            (zeros(nh * d), zeros(nh * d), zeros(nkv * d), zeros(nkv * d));
        let per_seq = mask.len() == b * t * t;
        for s in 0..b {
            let m = |i: usize, j: usize| mask[if per_seq { s * t * t } else { 0 } + i * t + j];
            for hd in 0..nh {
                let g = hd / (nh / nkv);
                let (qo, ko) = (hd * d, g * d);
                for i in 0..t {
                    let r = s * t + i;
                    let sc: Vec<f64> = (0..t)
                        .map(|j| {
                            let dot: f64 =
                                (0..d).map(|x| q[r][qo + x] * k[s * t + j][ko + x]).sum();
                            dot * scale + m(i, j)
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                    for x in 0..d {
                        out[r][qo + x] = (0..t).map(|j| p[j] * v[s * t + j][ko + x]).sum();
                    }
                    let dp: Vec<f64> = (0..t)
                        .map(|j| (0..d).map(|x| dout[r][qo + x] * v[s * t + j][ko + x]).sum())
                        .collect();
                    let dot: f64 = (0..t).map(|j| dp[j] * p[j]).sum();
                    for j in 0..t {
                        let ds = p[j] * (dp[j] - dot) * scale;
                        for x in 0..d {
                            dq[r][qo + x] += ds * k[s * t + j][ko + x];
                            dk[s * t + j][ko + x] += ds * q[r][qo + x];
                            dv[s * t + j][ko + x] += p[j] * dout[r][qo + x];
                        }
                    }
                }
            }
        }
        (out, dq, dk, dv)
    }

    fn close(a: &Tensor, b: &[Vec<f64>], what: &str) {
        let a = a.to_vec2::<f64>().unwrap();
        for (ra, rb) in a.iter().zip(b) {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-10, "{what}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn chunked_composite_attention_equals_plain_loops() {
        // GQA (6 query heads on 2 K/V heads) and plain, odd lengths, chunks that do and do
        // not divide the length, and the probabilities kept (as the fused kernels do).
        for (b, t, nh, nkv, d) in [(2, 13, 6, 2, 4), (1, 9, 2, 2, 3)] {
            let h = Heads { b, t, nh, nkv, d };
            let (q, k, v, dout) = (
                rand((b * t, nh * d), 1),
                rand((b * t, nkv * d), 2),
                rand((b * t, nkv * d), 3),
                rand((b * t, nh * d), 4),
            );
            for mask in masks(b, t) {
                let mv = mask.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let rows = |x: &Tensor| x.to_vec2::<f64>().unwrap();
                let (out_r, dq_r, dk_r, dv_r) =
                    reference(&rows(&q), &rows(&k), &rows(&v), &rows(&dout), &mv, h);
                for chunk in [t, 4, 5, 1] {
                    let (kept, out) = composite_forward(&q, &k, &v, &mask, h, chunk).unwrap();
                    close(&out, &out_r, "out");
                    let (dq, dk, dv) =
                        composite_backward(&q, &k, &v, &kept, &out, &dout, &mask, h, chunk)
                            .unwrap();
                    close(&dq, &dq_r, "dq");
                    close(&dk, &dk_r, "dk");
                    close(&dv, &dv_r, "dv");
                    // The same backward from kept probabilities, rebuilt from the log-sum-exp.
                    let Kept::Lse(lse) = &kept else {
                        panic!("composite keeps the lse")
                    };
                    let (qg, kk, _) = grouped(&q, &k, &v, h).unwrap();
                    let s = scores(&qg, &kk, &mask, h, 0, t, 1.0 / (d as f64).sqrt()).unwrap();
                    let probs = Kept::Probs(s.broadcast_sub(lse).unwrap().exp().unwrap());
                    let (dq, _, dv) =
                        composite_backward(&q, &k, &v, &probs, &out, &dout, &mask, h, chunk)
                            .unwrap();
                    close(&dq, &dq_r, "dq from probs");
                    close(&dv, &dv_r, "dv from probs");
                }
            }
            assert_eq!(q.dtype(), DType::F64);
        }
    }
}
