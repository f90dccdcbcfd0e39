//! One-pass row kernels: SwiGLU forward and backward, and the RMSNorm backward (with the
//! residual gradient folded in).

use super::par::{for_rows, for_rows2};
use super::{exp, tensor, with_f32};
use candle_core::{Result, Tensor};

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

multiversion! {
    fn swiglu_row(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }

    fn swiglu_backward_row(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
        let n = dg.len().min(du.len()).min(g.len()).min(u.len()).min(d.len());
        for j in 0..n {
            let sg = sigmoid(g[j]);
            dg[j] = d[j] * u[j] * sg * (1.0 + g[j] * (1.0 - sg));
            du[j] = d[j] * g[j] * sg;
        }
    }

    fn rms_norm_backward_row(o: &mut [f32], x: &[f32], w: &[f32], dy: &[f32], eps: f64, res: Option<&[f32]>) {
        let n = o.len().min(x.len()).min(w.len()).min(dy.len());
        let mut gw = [0f32; 8];
        let mut lanes = [0f32; 8];
        let mut j = 0;
        while j + 8 <= n {
            for k in 0..8 {
                gw[k] += dy[j + k] * w[j + k] * x[j + k];
                lanes[k] += x[j + k] * x[j + k];
            }
            j += 8;
        }
        let (mut ss, mut gx) = (lanes.iter().sum::<f32>() as f64, gw.iter().sum::<f32>() as f64);
        for k in j..n {
            ss += (x[k] * x[k]) as f64;
            gx += (dy[k] * w[k] * x[k]) as f64;
        }
        let r = 1.0 / (ss / n as f64 + eps).sqrt();
        let c = (r * r * r * gx / n as f64) as f32;
        let r = r as f32;
        for j in 0..n {
            o[j] = dy[j] * w[j] * r - x[j] * c;
        }
        if let Some(res) = res {
            for (o, &a) in o.iter_mut().zip(res) {
                *o += a;
            }
        }
    }
}

/// `silu(gate) · up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Option<Result<Tensor>> {
    if gate.dims() != up.dims() {
        return None;
    }
    let cols = *gate.dims().last()?;
    with_f32(gate, |g| {
        with_f32(up, |u| {
            let mut out = vec![0f32; g.len()];
            for_rows(&mut out, cols, |i, o| {
                swiglu_row(o, &g[i * cols..][..cols], &u[i * cols..][..cols]);
            });
            tensor(out, gate.dims())
        })
    })
    .flatten()
}

/// Gradients `(dgate, dup)` of `silu(gate) · up` given `dact`:
/// `dgate = dact · up · σ(g)(1 + g(1 − σ(g)))`, `dup = dact · g σ(g)`.
pub fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    dact: &Tensor,
) -> Option<Result<(Tensor, Tensor)>> {
    if gate.dims() != up.dims() || gate.dims() != dact.dims() {
        return None;
    }
    let cols = *gate.dims().last()?;
    with_f32(gate, |g| {
        with_f32(up, |u| {
            with_f32(dact, |d| {
                let mut dg = vec![0f32; g.len()];
                let mut du = vec![0f32; g.len()];
                for_rows2(&mut dg, cols, &mut du, cols, |i, dg, du| {
                    let s = i * cols;
                    swiglu_backward_row(dg, du, &g[s..][..cols], &u[s..][..cols], &d[s..][..cols]);
                });
                Ok((tensor(dg, gate.dims())?, tensor(du, gate.dims())?))
            })
        })
    })
    .flatten()
    .flatten()
}

/// `residual + ∂/∂x` of `y = x · rsqrt(mean(x²) + ε) · w` given `dy`, over the last dimension
/// (`residual` is the gradient already flowing into `x` past the norm, when there is one).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
) -> Option<Result<Tensor>> {
    let cols = *x.dims().last()?;
    if x.dims() != dy.dims() || w.dims() != [cols] || residual.is_some_and(|r| r.dims() != x.dims())
    {
        return None;
    }
    let dims = x.dims();
    let run = |x: &[f32], w: &[f32], dy: &[f32], res: Option<&[f32]>| {
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, cols, |i, o| {
            let s = i * cols;
            let res = res.map(|r| &r[s..][..cols]);
            rms_norm_backward_row(o, &x[s..][..cols], w, &dy[s..][..cols], eps, res);
        });
        tensor(out, dims)
    };
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            with_f32(dy, |ds| match residual {
                None => Some(run(xs, ws, ds, None)),
                Some(r) => with_f32(r, |rs| run(xs, ws, ds, Some(rs))),
            })
        })
    })
    .flatten()
    .flatten()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_rel_diff, rand};
    use candle_core::D;

    // Odd widths and row counts on both sides of the threading threshold.
    const SHAPES: [(usize, usize); 4] = [(1, 1), (3, 17), (37, 129), (61, 1536)];

    #[test]
    fn swiglu_matches_composite() {
        for (k, &(r, c)) in SHAPES.iter().enumerate() {
            let g = rand(&[r, c], 1 + k as u64, 6.0);
            let u = rand(&[r, c], 10 + k as u64, 2.0);
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let got = swiglu(&g, &u).unwrap().unwrap();
            assert!(max_rel_diff(&got, &want) < 1e-6, "{r}x{c}");
        }
    }

    #[test]
    fn swiglu_backward_matches_composite() {
        for (k, &(r, c)) in SHAPES.iter().enumerate() {
            let g = rand(&[r, c], 2 + k as u64, 6.0);
            let u = rand(&[r, c], 20 + k as u64, 2.0);
            let d = rand(&[r, c], 30 + k as u64, 1.0);
            let sig = candle_nn::ops::sigmoid(&g).unwrap();
            let one_minus = (1.0 - &sig).unwrap();
            let dsilu = (&sig * ((&g * one_minus).unwrap() + 1.0).unwrap()).unwrap();
            let want_dg = ((&d * &u).unwrap() * dsilu).unwrap();
            let want_du = (&d * (&g * &sig).unwrap()).unwrap();
            let (dg, du) = swiglu_backward(&g, &u, &d).unwrap().unwrap();
            assert!(max_rel_diff(&dg, &want_dg) < 1e-6, "dgate {r}x{c}");
            assert!(max_rel_diff(&du, &want_du) < 1e-6, "dup {r}x{c}");
        }
    }

    fn rms_composite(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Tensor {
        let g = dy.broadcast_mul(w).unwrap();
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let gx = (&g * x).unwrap().mean_keepdim(D::Minus1).unwrap();
        let r3 = r.powf(3.0).unwrap();
        (g.broadcast_mul(&r).unwrap() - x.broadcast_mul(&(r3 * gx).unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn rms_norm_backward_matches_composite_with_and_without_residual() {
        for (k, &(r, c)) in SHAPES.iter().enumerate() {
            let x = rand(&[r, c], 3 + k as u64, 3.0);
            let w = rand(&[c], 40 + k as u64, 1.5);
            let dy = rand(&[r, c], 50 + k as u64, 1.0);
            let res = rand(&[r, c], 60 + k as u64, 1.0);
            let want = rms_composite(&x, &w, &dy, 1e-5);
            let got = rms_norm_backward(&x, &w, &dy, 1e-5, None).unwrap().unwrap();
            assert!(max_rel_diff(&got, &want) < 2e-5, "{r}x{c}");
            let got = rms_norm_backward(&x, &w, &dy, 1e-5, Some(&res))
                .unwrap()
                .unwrap();
            assert!(
                max_rel_diff(&got, &(want + &res).unwrap()) < 2e-5,
                "{r}x{c} + residual"
            );
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let g = rand(&[4, 6], 1, 1.0);
        let t = g.t().unwrap();
        assert!(swiglu(&t, &t).is_none(), "non-contiguous");
        let g64 = g.to_dtype(candle_core::DType::F64).unwrap();
        assert!(swiglu(&g64, &g64).is_none(), "f64");
        let u = rand(&[4, 5], 2, 1.0);
        assert!(swiglu(&g, &u).is_none(), "shape mismatch");
    }
}
