//! Decoding's per-token kernels on plain slices: RMSNorm, RoPE, SwiGLU, a LoRA pair's term and
//! one query's attention over a KV cache. A token's vectors are a few thousand floats: as
//! tensor ops each of these cost an allocation and a dispatch more than their arithmetic (about
//! 600 such ops a token on SmolLM2, a quarter of its decode time), so the fused token step
//! (`model::decode`) runs them here, on the calling thread except where the work is large.

use super::dot;
use super::exp::exp;
use super::matvec::{self, Rows};
use super::par::{self, SendPtr};

multiversion! {
    /// `out = x / √(mean(x²) + eps) · w`.
    fn rms_norm_into(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let ss = dot(x, x);
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((o, &a), &g) in out.iter_mut().zip(x).zip(w) {
            *o = a * r * g;
        }
    }

    /// Rotates each `d`-wide head of `x` in place by one position's angle (`cos`, `sin`:
    /// `d/2` each), in the half-split convention of `kernels::rope`.
    fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize) {
        let half = d / 2;
        for h in x.chunks_exact_mut(d) {
            let (x1, x2) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// Scores scaled by `scale`, turned into probabilities in place.
    fn softmax_scaled(row: &mut [f32], scale: f32) {
        let mut max = f32::NEG_INFINITY;
        for s in row.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = exp(*s - max);
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in row.iter_mut() {
            *s *= inv;
        }
    }

    /// One query head against `len` keys and values (rows of `d`): softmax(q·kᵀ·scale)·v into
    /// `out`; `scores` holds `len` values.
    fn attend_head(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], scale: f32) {
        let d = q.len();
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &k[j * d..(j + 1) * d]) * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = exp(*s - max);
            sum += *s;
        }
        let inv = 1.0 / sum;
        out.fill(0.0);
        for (j, &s) in scores.iter().enumerate() {
            let p = s * inv;
            for (o, &x) in out.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *o += p * x;
            }
        }
    }

    /// `g = silu(g)·u`, as `kernels::swiglu` computes it.
    fn swiglu_in_place(g: &mut [f32], u: &[f32]) {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g * (1.0 / (1.0 + exp(-*g))) * u;
        }
    }

    /// `out[i] = a_i · x` for the `out.len()` rows of `a` (`x.len()` wide) from row `row0`.
    fn rows_dot(out: &mut [f32], a: &[f32], x: &[f32], row0: usize) {
        let cols = x.len();
        for (i, o) in out.iter_mut().enumerate() {
            let r = row0 + i;
            *o = dot(&a[r * cols..(r + 1) * cols], x);
        }
    }
}

/// `y = x / √(mean(x²) + eps) · w`, a fresh vector.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    rms_norm_into(&mut out, x, w, eps);
    out
}

/// RoPE on every `d`-wide head of one position's `x`, in place.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize) {
    if d >= 2 && cos.len() >= d / 2 && sin.len() >= d / 2 {
        rope_in_place(x, cos, sin, d);
    }
}

/// `silu(gate)·up` into `gate` (the two halves of `gate_up`, `[gate | up]`); returns the
/// gate half.
pub fn swiglu(gate_up: &mut [f32]) -> &[f32] {
    let n = gate_up.len() / 2;
    let (g, u) = gate_up.split_at_mut(n);
    swiglu_in_place(g, u);
    g
}

/// `out = M·x` for the row-major `[out.len(), x.len()]` matrix `m`, in parallel when large.
pub fn matvec(out: &mut [f32], m: &[f32], x: &[f32]) {
    let (rows, cols) = (out.len(), x.len());
    if m.len() < rows * cols {
        return;
    }
    let p = SendPtr::of(out);
    par::for_chunks(rows, rows * cols, |r| {
        // SAFETY: each range of rows is handed out once, inside `out`.
        let o = unsafe { p.slice(r.start, r.len()) };
        rows_dot(o, m, x, r.start);
    });
}

/// Adds a LoRA pair's term `scale · B (A x)` to `y`: `a` is `[r, x.len()]`, `b` is
/// `[y.len(), r]`, both row-major.
pub fn add_low_rank(y: &mut [f32], x: &[f32], a: &[f32], b: &[f32], scale: f32) {
    let r = a.len() / x.len().max(1);
    let mut xa = vec![0f32; r];
    matvec(&mut xa, a, x);
    for v in xa.iter_mut() {
        *v *= scale;
    }
    let mut delta = vec![0f32; y.len()];
    matvec(&mut delta, b, &xa);
    for (o, d) in y.iter_mut().zip(&delta) {
        *o += d;
    }
}

/// One query per head (`q`, `nh·d`) against the first `len` positions of a KV cache's key and
/// value buffers (`[nkv, cap, d]` each, in f32, f16 or bf16), each query head reading its
/// group's K/V head, into `out` (`nh·d`). The query heads of a group that a thread takes read
/// its keys, then its values, in one pass each ([`matvec`]'s kernels, which widen half
/// precision in registers). Heads run in parallel once the cache is long enough to pay for it.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    out: &mut [f32],
    q: &[f32],
    k: Rows,
    v: Rows,
    (nh, nkv, d): (usize, usize, usize),
    cap: usize,
    len: usize,
) {
    let rep = nh / nkv.max(1);
    if rep == 0 || d == 0 || len == 0 || nkv * cap * d > k.len().min(v.len()) || len > cap {
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let p = SendPtr::of(out);
    if let (Rows::F32(k), Rows::F32(v)) = (k, v) {
        // An f32 cache: one head at a time, which measured faster on short heads (d = 64)
        // than the grouped pass below.
        par::for_chunks(nh, 4 * nh * len * d, |heads| {
            let mut scores = vec![0f32; len];
            for h in heads {
                let g = h / rep;
                let (kg, vg) = (&k[g * cap * d..][..len * d], &v[g * cap * d..][..len * d]);
                // SAFETY: head h's output is inside `out` and written by this chunk alone.
                let oh = unsafe { p.slice(h * d, d) };
                attend_head(oh, &q[h * d..(h + 1) * d], kg, vg, &mut scores, scale);
            }
        });
        return;
    }
    par::for_chunks(nh, 4 * nh * len * d, |heads| {
        let mut scores = vec![0f32; matvec::MAX_ROWS * len];
        let mut h = heads.start;
        while h < heads.end {
            let g = h / rep;
            // This chunk's heads of group g, as many as one pass takes.
            let n = (heads.end.min((g + 1) * rep) - h).min(matvec::MAX_ROWS);
            let span = g * cap * d..(g * cap + len) * d;
            let (kg, vg) = (k.range(span.clone()), v.range(span));
            let s = &mut scores[..n * len];
            matvec::rows_of(kg, &q[h * d..(h + n) * d], n, 0..len, SendPtr::of(s), len);
            for row in s.chunks_exact_mut(len) {
                softmax_scaled(row, scale);
            }
            // SAFETY: heads h..h + n's outputs are inside `out` and this chunk's alone.
            let o = unsafe { p.slice(h * d, n * d) };
            o.fill(0.0);
            matvec::add_weighted_rows(o, s, vg, n);
            h += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn rand(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 97);
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `out` against softmax(q·kᵀ/√d)·v in f64 on the cache's values as stored.
    fn check_attention(out: &[f32], q: &[f32], k: &[f32], v: &[f32], shape: [usize; 5]) {
        let [nh, nkv, d, cap, len] = shape;
        for h in 0..nh {
            let g = h / (nh / nkv);
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|i| q[h * d + i] as f64 * k[(g * cap + j) * d + i] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..d {
                let want: f64 = (0..len)
                    .map(|j| e[j] / z * v[(g * cap + j) * d + i] as f64)
                    .sum();
                assert!(
                    (out[h * d + i] as f64 - want).abs() < 1e-5,
                    "{shape:?}: head {h} dim {i}"
                );
            }
        }
    }

    #[test]
    fn attention_matches_a_direct_softmax() {
        // Two groups of three heads; one group of eighteen (more than a pass takes); a cache
        // long enough for several value tiles, a ragged last one and the thread pool.
        for shape in [
            [6, 2, 8, 10, 7],
            [18, 1, 16, 40, 37],
            [8, 2, 64, 1100, 1029],
        ] {
            let [nh, nkv, d, cap, _] = shape;
            let (q, k, v) = (
                rand(nh * d, 1),
                rand(nkv * cap * d, 2),
                rand(nkv * cap * d, 3),
            );
            let mut out = vec![0f32; nh * d];
            let dims = (nh, nkv, d);
            attend(
                &mut out,
                &q,
                Rows::F32(&k),
                Rows::F32(&v),
                dims,
                cap,
                shape[4],
            );
            check_attention(&out, &q, &k, &v, shape);

            // A half-precision cache: the same sums over its values widened.
            let (k16, v16): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let wide = |h: &[f16]| h.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            attend(
                &mut out,
                &q,
                Rows::F16(&k16),
                Rows::F16(&v16),
                dims,
                cap,
                shape[4],
            );
            check_attention(&out, &q, &wide(&k16), &wide(&v16), shape);
            let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
                k.iter().map(|&x| bf16::from_f32(x)).collect(),
                v.iter().map(|&x| bf16::from_f32(x)).collect(),
            );
            let wide = |h: &[bf16]| h.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            attend(
                &mut out,
                &q,
                Rows::Bf16(&kb),
                Rows::Bf16(&vb),
                dims,
                cap,
                shape[4],
            );
            check_attention(&out, &q, &wide(&kb), &wide(&vb), shape);
        }
    }

    #[test]
    fn norm_rope_and_low_rank_match_their_formulas() {
        let (x, w) = (rand(64, 4), rand(64, 5));
        let y = rms_norm(&x, &w, 1e-5);
        let r = 1.0 / ((x.iter().map(|a| a * a).sum::<f32>() / 64.0 + 1e-5).sqrt());
        for i in 0..64 {
            assert!((y[i] - x[i] * r * w[i]).abs() < 1e-5);
        }

        let (cos, sin) = (rand(4, 6), rand(4, 7));
        let mut z = x[..16].to_vec();
        rope(&mut z, &cos, &sin, 8);
        for h in 0..2 {
            for i in 0..4 {
                let (a, b) = (x[h * 8 + i], x[h * 8 + i + 4]);
                assert!((z[h * 8 + i] - (a * cos[i] - b * sin[i])).abs() < 1e-6);
                assert!((z[h * 8 + i + 4] - (b * cos[i] + a * sin[i])).abs() < 1e-6);
            }
        }

        // y += s·B(Ax), against the sums written out.
        let (a, b) = (rand(3 * 64, 8), rand(10 * 3, 9));
        let mut y = rand(10, 10);
        let before = y.clone();
        add_low_rank(&mut y, &x, &a, &b, 0.5);
        for o in 0..10 {
            let want: f32 = (0..3)
                .map(|j| b[o * 3 + j] * (0..64).map(|i| a[j * 64 + i] * x[i]).sum::<f32>())
                .sum::<f32>()
                * 0.5
                + before[o];
            assert!((y[o] - want).abs() < 1e-4, "{o}: {} vs {want}", y[o]);
        }

        let mut gu = [0.5f32, -1.0, 2.0, 3.0];
        let act = swiglu(&mut gu).to_vec();
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert!((act[0] - silu(0.5) * 2.0).abs() < 1e-6);
        assert!((act[1] - silu(-1.0) * 3.0).abs() < 1e-6);
    }
}
