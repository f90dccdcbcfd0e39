//! Rotary position embedding on the projections' own `[B·T, heads·d]` layout: no transposes
//! into `[B, heads, T, d]` and back (each was a full copy of q or k, twice per block per pass).

use super::par::for_rows;
use super::{tensor, with_f32};
use candle_core::{Result, Tensor};

/// Rotates every `d`-wide head of each row of `x` (`[B·T, heads·d]`) by its position's angle,
/// in the half-split convention (`x[i]` pairs with `x[i + d/2]`, as Llama checkpoints use):
/// `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin`. `cos`, `sin` are `[T, d/2]`, or `[B, T, d/2]`
/// when positions differ per sequence. `inverse` rotates by the opposite angle (the backward).
/// `None` when the inputs are not contiguous f32 on the CPU or the shapes do not match.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    t: usize,
    d: usize,
    inverse: bool,
) -> Option<Result<Tensor>> {
    let (rows, width) = x.dims2().ok()?;
    let half = d / 2;
    if d == 0
        || !d.is_multiple_of(2)
        || !width.is_multiple_of(d)
        || t == 0
        || !rows.is_multiple_of(t)
        || cos.dims() != sin.dims()
    {
        return None;
    }
    let per_sequence = match cos.dims() {
        [ct, h] if *ct >= t && *h == half => false,
        [cb, ct, h] if *cb == rows / t && *ct == t && *h == half => true,
        _ => return None,
    };
    let sign = if inverse { -1.0f32 } else { 1.0 };
    with_f32(x, |xs| {
        with_f32(cos, |cs| {
            with_f32(sin, |ss| {
                let mut out = vec![0f32; xs.len()];
                for_rows(&mut out, width, |r, o| {
                    let pos = if per_sequence { r } else { r % t };
                    let (c, s) = (&cs[pos * half..][..half], &ss[pos * half..][..half]);
                    let x = &xs[r * width..][..width];
                    for (oh, xh) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                        let (o1, o2) = oh.split_at_mut(half);
                        let (x1, x2) = xh.split_at(half);
                        for i in 0..half {
                            let s = sign * s[i];
                            o1[i] = x1[i] * c[i] - x2[i] * s;
                            o2[i] = x2[i] * c[i] + x1[i] * s;
                        }
                    }
                });
                tensor(out, &[rows, width])
            })
        })
    })
    .flatten()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_rel_diff, rand};

    /// candle's own rope on the `[B, heads, T, d]` layout, brought back to `[B·T, heads·d]`.
    fn composite(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        b: usize,
        t: usize,
        n: usize,
        d: usize,
    ) -> Tensor {
        let h = x
            .reshape((b, t, n, d))
            .and_then(|h| h.transpose(1, 2))
            .and_then(|h| h.contiguous())
            .unwrap();
        candle_nn::rotary_emb::rope(&h, cos, sin)
            .and_then(|y| y.transpose(1, 2))
            .and_then(|y| y.reshape((b * t, n * d)))
            .unwrap()
    }

    #[test]
    fn matches_the_composite_rotation_and_inverts() {
        // (batch, length, heads, head dim): odd lengths and head counts.
        for (k, &(b, t, n, d)) in [(1, 1, 1, 2), (2, 7, 3, 8), (3, 61, 9, 64)]
            .iter()
            .enumerate()
        {
            let seed = 10 * k as u64;
            let x = rand(&[b * t, n * d], seed, 2.0);
            let cos = rand(&[t, d / 2], seed + 1, 1.0);
            let sin = rand(&[t, d / 2], seed + 2, 1.0);
            let got = rope(&x, &cos, &sin, t, d, false).unwrap().unwrap();
            assert!(max_rel_diff(&got, &composite(&x, &cos, &sin, b, t, n, d)) < 1e-6);
            let back = rope(&x, &cos, &sin.neg().unwrap(), t, d, true)
                .unwrap()
                .unwrap();
            assert!(max_rel_diff(&back, &got) < 1e-6, "inverse of −sin is +sin");
            // Per-sequence tables ([B, T, d/2]).
            let cos3 = rand(&[b, t, d / 2], seed + 3, 1.0);
            let sin3 = rand(&[b, t, d / 2], seed + 4, 1.0);
            let got = rope(&x, &cos3, &sin3, t, d, false).unwrap().unwrap();
            assert!(max_rel_diff(&got, &composite(&x, &cos3, &sin3, b, t, n, d)) < 1e-6);
        }
    }

    #[test]
    fn a_true_rotation_is_undone_by_its_inverse() {
        let (t, d) = (5, 4);
        let angles: Vec<f32> = (0..t * d / 2).map(|i| i as f32 * 0.37).collect();
        let cos = Tensor::from_vec(
            angles.iter().map(|a| a.cos()).collect(),
            (t, d / 2),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let sin = Tensor::from_vec(
            angles.iter().map(|a| a.sin()).collect(),
            (t, d / 2),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let x = rand(&[2 * t, 3 * d], 7, 1.0);
        let y = rope(&x, &cos, &sin, t, d, false).unwrap().unwrap();
        let back = rope(&y, &cos, &sin, t, d, true).unwrap().unwrap();
        assert!(max_rel_diff(&back, &x) < 1e-6);
    }

    #[test]
    fn declines_odd_head_dims_and_mismatched_tables() {
        let x = rand(&[4, 6], 1, 1.0);
        let cos = rand(&[4, 1], 2, 1.0);
        assert!(rope(&x, &cos, &cos, 4, 3, false).is_none(), "odd head dim");
        let cos = rand(&[2, 3], 2, 1.0);
        assert!(
            rope(&x, &cos, &cos, 4, 6, false).is_none(),
            "table shorter than T"
        );
    }
}
