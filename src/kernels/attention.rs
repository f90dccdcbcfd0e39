//! Causal self-attention on the projections' `[B·T, heads·d]` layout, forward and backward.
//!
//! Each (sequence, head) is one unit of work: its scores, masked softmax and output are
//! computed with single-threaded GEMMs on strided views of q, k and v, so no head is ever
//! copied out, no `[B, heads, T, T]` temporary is made besides the probabilities the backward
//! keeps, and grouped-query heads read their shared K/V head in place. candle's path for the
//! same work (batched matmuls, a broadcast mask add, softmax, transposes) took ~2.4 ms a block
//! on SmolLM2 at 4 × 60 tokens, almost none of it arithmetic.

use super::gemm::{gemm_serial, Dst, Op, View};
use super::matvec::Matrix;
use super::par::{for_chunks, for_rows, SendPtr};
use super::tensor;
use super::{dot, exp, with_f32};
use candle_core::{Result, Tensor};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Sequences and their (padded) length.
    pub b: usize,
    pub t: usize,
    /// Query heads, key/value heads, head dimension.
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
}

impl Heads {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
    fn ok(&self) -> bool {
        self.b > 0 && self.t > 0 && self.d > 0 && self.nkv > 0 && self.nh.is_multiple_of(self.nkv)
    }
}

/// Query rows handled together: with a causal mask, a block of rows ending at row `r` needs
/// keys `0..r` only, so the masked upper triangle (half the work) is never computed.
const ROW_BLOCK: usize = 64;

/// The row blocks of a `t`-row attention and the keys each needs: `(first row, rows, keys)`.
fn row_blocks(t: usize, causal: bool) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t.div_ceil(ROW_BLOCK)).map(move |i| {
        let r0 = i * ROW_BLOCK;
        let rows = ROW_BLOCK.min(t - r0);
        (r0, rows, if causal { r0 + rows } else { t })
    })
}

/// Whether every mask hides every key after its query (`mask` holds whole `[t, t]` masks).
fn is_causal(mask: &[f32], t: usize) -> bool {
    mask.chunks_exact(t * t).all(|m| {
        m.chunks_exact(t)
            .enumerate()
            .all(|(i, row)| row[i + 1..].iter().all(|&x| x == f32::NEG_INFINITY))
    })
}

/// `softmax(scale · q kᵀ + mask) v` per head. `q` is `[B·T, nh·d]`, `k` and `v` `[B·T, nkv·d]`
/// (query head `h` reads K/V head `h / (nh/nkv)`), `mask` is additive (0 or −∞), `[T, T]` for
/// every sequence or `[B, T, T]` (any shape with those elements, e.g. `[B, 1, 1, T, T]`).
/// Returns the probabilities `[B, nh, T, T]` and the output `[B·T, nh·d]`. `None` when the
/// inputs are not contiguous f32 on the CPU or their shapes do not match.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    h: Heads,
    scale: f32,
) -> Option<Result<(Tensor, Tensor)>> {
    let Heads { b, t, nh, nkv, d } = h;
    if !h.ok()
        || q.dims() != [b * t, nh * d]
        || k.dims() != [b * t, nkv * d]
        || v.dims() != [b * t, nkv * d]
    {
        return None;
    }
    let per_sequence = match mask.elem_count() {
        n if n == t * t => false,
        n if n == b * t * t && b > 1 => true,
        _ => return None,
    };
    let (qv, kv, vv, mv) = (View::of(q)?, View::of(k)?, View::of(v)?, View::of(mask)?);
    let (qs, ks, vs, ms) = (qv.slice(), kv.slice(), vv.slice(), mv.slice());
    let causal = is_causal(ms, t);
    let (qw, kw) = (nh * d, nkv * d);
    let mut probs = vec![0f32; b * nh * t * t];
    let mut out = vec![0f32; b * t * qw];
    let (pp, op) = (SendPtr::of(&mut probs), SendPtr::of(&mut out));
    let out_len = out.len();
    // One unit per (sequence, head, block of query rows): enough of them to keep every thread
    // busy at batch 1, and with a causal mask the later blocks (more keys) cost more, which
    // the pool's shared cursor evens out.
    let blocks: Vec<_> = row_blocks(t, causal).collect();
    let nb = blocks.len();
    for_chunks(b * nh * nb, b * nh * t * t * d, |units| {
        for u in units {
            let (bh, (r0, rows, keys)) = (u / nb, blocks[u % nb]);
            let (bi, hi) = (bh / nh, bh % nh);
            let g = hi / h.rep();
            // SAFETY: the unit owns rows r0.. of probability block bh and the same rows of
            // head hi of sequence bi's output, which no other unit touches.
            let pb = unsafe { pp.slice((bh * t + r0) * t, rows * t) };
            let out = unsafe { Dst::from_raw(op, out_len, qw) }.at(bi * t + r0, hi * d);
            let m = if per_sequence { &ms[bi * t * t..] } else { ms };
            let (q0, kv0) = ((bi * t + r0) * qw + hi * d, bi * t * kw + g * d);
            let qh = Op::rows(&qs[q0..], qw);
            let kt = Op::transposed(&ks[kv0..], kw);
            gemm_serial(rows, keys, d, Dst::rows(pb, t), false, qh, kt, scale);
            for (i, row) in pb.chunks_exact_mut(t).enumerate() {
                let mrow = &m[(r0 + i) * t..][..keys];
                masked_softmax(&mut row[..keys], mrow);
            }
            let vh = Op::rows(&vs[kv0..], kw);
            gemm_serial(rows, d, keys, out, false, Op::rows(pb, t), vh, 1.0);
        }
    });
    Some((|| {
        Ok((tensor(probs, &[b, nh, t, t])?, tensor(out, &[b * t, qw])?))
    })())
}

/// Gradients `(dq, dk, dv)` of [`attention`] given its probabilities and `dout` (`[B·T, nh·d]`),
/// in the layouts of q, k and v (`mask` as given to the forward).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    probs: &Tensor,
    dout: &Tensor,
    h: Heads,
    scale: f32,
) -> Option<Result<(Tensor, Tensor, Tensor)>> {
    let Heads { b, t, nh, nkv, d } = h;
    if !h.ok()
        || q.dims() != [b * t, nh * d]
        || dout.dims() != [b * t, nh * d]
        || k.dims() != [b * t, nkv * d]
        || v.dims() != [b * t, nkv * d]
        || probs.elem_count() != b * nh * t * t
        || (mask.elem_count() != t * t && mask.elem_count() != b * t * t)
    {
        return None;
    }
    let mv = View::of(mask)?;
    let causal = is_causal(mv.slice(), t);
    let views = (
        View::of(q)?,
        View::of(k)?,
        View::of(v)?,
        View::of(probs)?,
        View::of(dout)?,
    );
    let (qs, ks, vs, ps, dos) = (
        views.0.slice(),
        views.1.slice(),
        views.2.slice(),
        views.3.slice(),
        views.4.slice(),
    );
    let (qw, kw, rep) = (nh * d, nkv * d, h.rep());
    let mut dq = vec![0f32; b * t * qw];
    // dK and dV per query head ([B, nh, T, d]), summed over each K/V head's group below: one
    // unit per (sequence, query head) keeps both threads busy at batch 1, where there are as
    // few K/V heads as 3.
    let mut dkh = vec![0f32; b * nh * t * d];
    let mut dvh = vec![0f32; b * nh * t * d];
    let lq = dq.len();
    let (pq, pk, pv) = (
        SendPtr::of(&mut dq),
        SendPtr::of(&mut dkh),
        SendPtr::of(&mut dvh),
    );
    let blocks: Vec<_> = row_blocks(t, causal).collect();
    for_chunks(b * nh, 4 * b * nh * t * t * d, |units| {
        let mut ds = vec![0f32; ROW_BLOCK.min(t) * t];
        for u in units {
            let (bi, hi) = (u / nh, u % nh);
            let kv0 = bi * t * kw + (hi / rep) * d;
            let (kg, vt) = (Op::rows(&ks[kv0..], kw), Op::transposed(&vs[kv0..], kw));
            let p = &ps[u * t * t..][..t * t];
            let q0 = bi * t * qw + hi * d;
            // SAFETY: unit u owns head hi of sequence bi in dq and its own dK, dV blocks.
            let (dqh, dkd, dvd) = unsafe {
                (
                    Dst::from_raw(pq, lq, qw).at(bi * t, hi * d),
                    Dst::rows(pk.slice(u * t * d, t * d), d),
                    Dst::rows(pv.slice(u * t * d, t * d), d),
                )
            };
            for &(r0, rows, keys) in &blocks {
                let doh = Op::rows(&dos[q0 + r0 * qw..], qw);
                let qh = Op::rows(&qs[q0 + r0 * qw..], qw);
                // dV += Pᵀ dO
                let pt = Op::transposed(&p[r0 * t..], t);
                gemm_serial(keys, d, rows, dvd, true, pt, doh, 1.0);
                // dP = dO Vᵀ, then dS = scale · P ⊙ (dP − Σⱼ dPⱼ Pⱼ)
                let dsb = &mut ds[..rows * keys];
                gemm_serial(rows, keys, d, Dst::rows(dsb, keys), false, doh, vt, 1.0);
                for (i, drow) in dsb.chunks_exact_mut(keys).enumerate() {
                    let prow = &p[(r0 + i) * t..][..keys];
                    let dot = dot(drow, prow);
                    for (x, &pj) in drow.iter_mut().zip(prow) {
                        *x = scale * pj * (*x - dot);
                    }
                }
                // dQ = dS K, dK += dSᵀ Q
                let dsr = Op::rows(dsb, keys);
                gemm_serial(rows, d, keys, dqh.at(r0, 0), false, dsr, kg, 1.0);
                let dst = Op::transposed(dsb, keys);
                gemm_serial(keys, d, rows, dkd, true, dst, qh, 1.0);
            }
        }
    });
    // dk, dv [B·T, nkv·d]: each K/V head's row is the sum of its query heads' rows.
    let group_sum = |per_head: &[f32]| {
        let mut out = vec![0f32; b * t * kw];
        for_rows(&mut out, kw, |row, o| {
            let (bi, tt) = (row / t, row % t);
            for (g, og) in o.chunks_exact_mut(d).enumerate() {
                for r in 0..rep {
                    let src = &per_head[((bi * nh + g * rep + r) * t + tt) * d..][..d];
                    for (x, &y) in og.iter_mut().zip(src) {
                        *x += y;
                    }
                }
            }
        });
        out
    };
    let (dk, dv) = (group_sum(&dkh), group_sum(&dvh));
    drop((dkh, dvh));
    Some((|| {
        Ok((
            tensor(dq, &[b * t, qw])?,
            tensor(dk, &[b * t, kw])?,
            tensor(dv, &[b * t, kw])?,
        ))
    })())
}

/// `row ← softmax(row + mask)` in place; masked entries (−∞) come out exactly 0.
fn masked_softmax(row: &mut [f32], mask: &[f32]) {
    let mut max = f32::NEG_INFINITY;
    for (x, &m) in row.iter_mut().zip(mask) {
        *x += m;
        max = max.max(*x);
    }
    if max == f32::NEG_INFINITY {
        // Nothing to attend to (never the case for causal masks, which keep the diagonal).
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            exp(*x - max)
        };
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Decoding's attention: one new query per head (`q`, `[1, nh, 1, d]`, f32) against the first
/// `len` positions of the key and value buffers (`[1, nkv, capacity, d]`, a KV cache, in f32,
/// f16 or bf16), each query head reading its group's K/V head. Plain dot products over
/// contiguous rows: for one query the GEMM's setup costs more than the arithmetic. Returns
/// `[1, nh, 1, d]`; `None` where it does not apply (not on the CPU, not contiguous).
pub fn attend_cached(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    len: usize,
    nkv: usize,
) -> Option<Result<Tensor>> {
    let (b, nh, t, d) = q.dims4().ok()?;
    let (kb, kh, cap, kd) = k.dims4().ok()?;
    if b != 1 || t != 1 || kb != 1 || kh != nkv || kd != d || len == 0 || len > cap {
        return None;
    }
    if nkv == 0 || !nh.is_multiple_of(nkv) || v.dims() != k.dims() {
        return None;
    }
    // The buffers as rows of d: a view of the same storage.
    let (k2, v2) = (
        k.reshape((nkv * cap, d)).ok()?,
        v.reshape((nkv * cap, d)).ok()?,
    );
    let (km, vm) = (Matrix::of(&k2)?, Matrix::of(&v2)?);
    let (kr, vr) = (km.data()?, vm.data()?);
    let out = with_f32(q, |qs| {
        let mut out = vec![0f32; nh * d];
        super::one_token::attend(&mut out, qs, kr, vr, (nh, nkv, d), cap, len);
        out
    })?;
    Some(tensor(out, &[1, nh, 1, d]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_rel_diff, rand};
    use candle_core::{Device, Var, D};

    /// Attention through candle autograd on the `[B, heads, T, d]` layout, with K/V heads
    /// repeated for their query heads: the oracle for forward and backward.
    fn composite(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        h: Heads,
        scale: f64,
    ) -> Tensor {
        let Heads { b, t, nh, nkv, d } = h;
        let heads = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let rep = |x: Tensor| -> candle_core::Result<Tensor> {
            x.unsqueeze(2)?
                .repeat((1, 1, nh / nkv, 1, 1))?
                .reshape((b, nh, t, d))
        };
        let (qh, kh, vh) = (
            heads(q, nh).unwrap(),
            rep(heads(k, nkv).unwrap()).unwrap(),
            rep(heads(v, nkv).unwrap()).unwrap(),
        );
        let mask = mask
            .reshape((mask.elem_count() / (t * t), 1, t, t))
            .unwrap();
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * t, nh * d))
            .unwrap()
    }

    fn causal(t: usize) -> Tensor {
        let m: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (1, 1, 1, t, t), &Device::Cpu).unwrap()
    }

    /// Per-sequence masks: causal, and the last `b` positions of sequence b see only themselves
    /// (as padding does in a packed batch).
    fn per_sequence(b: usize, t: usize) -> Tensor {
        let m: Vec<f32> = (0..b * t * t)
            .map(|i| {
                let (s, i, j) = (i / (t * t), i / t % t, i % t);
                let pad = i + s >= t && s > 0;
                if j > i || (pad && j != i) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (b, 1, 1, t, t), &Device::Cpu).unwrap()
    }

    // Lengths below, at and across the 64-row blocks (the last one partial).
    const SHAPES: [Heads; 5] = [
        Heads {
            b: 1,
            t: 1,
            nh: 1,
            nkv: 1,
            d: 2,
        },
        Heads {
            b: 2,
            t: 7,
            nh: 4,
            nkv: 2,
            d: 8,
        },
        Heads {
            b: 3,
            t: 13,
            nh: 3,
            nkv: 3,
            d: 5,
        },
        Heads {
            b: 2,
            t: 61,
            nh: 9,
            nkv: 3,
            d: 64,
        },
        Heads {
            b: 2,
            t: 150,
            nh: 4,
            nkv: 2,
            d: 16,
        },
    ];

    /// No mask at all (every key visible): the path that cannot skip the upper triangle.
    fn open(t: usize) -> Tensor {
        Tensor::zeros((t, t), candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_and_backward_match_autograd() {
        for (n, &h) in SHAPES.iter().enumerate() {
            for mask in [causal(h.t), per_sequence(h.b, h.t), open(h.t)] {
                let seed = 100 * n as u64;
                let q = rand(&[h.b * h.t, h.nh * h.d], seed, 1.5);
                let k = rand(&[h.b * h.t, h.nkv * h.d], seed + 1, 1.5);
                let v = rand(&[h.b * h.t, h.nkv * h.d], seed + 2, 1.0);
                let dout = rand(&[h.b * h.t, h.nh * h.d], seed + 3, 1.0);
                let scale = 1.0 / (h.d as f64).sqrt();
                let (probs, out) = attention(&q, &k, &v, &mask, h, scale as f32)
                    .unwrap()
                    .unwrap();
                let (vq, vk, vv) = (
                    Var::from_tensor(&q).unwrap(),
                    Var::from_tensor(&k).unwrap(),
                    Var::from_tensor(&v).unwrap(),
                );
                let want = composite(
                    vq.as_tensor(),
                    vk.as_tensor(),
                    vv.as_tensor(),
                    &mask,
                    h,
                    scale,
                );
                assert!(max_rel_diff(&out, &want) < 1e-5, "forward {h:?}");
                let g = (want * &dout)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let (dq, dk, dv) =
                    attention_backward(&q, &k, &v, &mask, &probs, &dout, h, scale as f32)
                        .unwrap()
                        .unwrap();
                for (name, got, var) in [("dq", dq, &vq), ("dk", dk, &vk), ("dv", dv, &vv)] {
                    let want = g.get(var.as_tensor()).unwrap();
                    assert!(max_rel_diff(&got, want) < 1e-5, "{name} {h:?}");
                }
            }
        }
    }

    #[test]
    fn masked_positions_get_exactly_zero_probability() {
        let h = Heads {
            b: 1,
            t: 6,
            nh: 2,
            nkv: 1,
            d: 4,
        };
        let q = rand(&[6, 8], 1, 3.0);
        let k = rand(&[6, 4], 2, 3.0);
        let (probs, _) = attention(&q, &k, &k, &causal(6), h, 0.5).unwrap().unwrap();
        let p = probs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, row) in p.chunks(6).enumerate() {
            let i = i % 6;
            assert!(row[i + 1..].iter().all(|&x| x == 0.0), "row {i}: {row:?}");
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn declines_mismatched_shapes() {
        let h = Heads {
            b: 2,
            t: 3,
            nh: 2,
            nkv: 1,
            d: 4,
        };
        let q = rand(&[6, 8], 1, 1.0);
        let k = rand(&[6, 4], 2, 1.0);
        assert!(
            attention(&q, &k, &k, &causal(4), h, 1.0).is_none(),
            "mask of another length"
        );
        assert!(
            attention(&k, &k, &k, &causal(3), h, 1.0).is_none(),
            "q too narrow"
        );
        let h3 = Heads { nkv: 3, ..h };
        assert!(
            attention(&q, &k, &k, &causal(3), h3, 1.0).is_none(),
            "heads not a multiple"
        );
    }
}
