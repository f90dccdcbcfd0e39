//! A frozen linear layer with a LoRA pair, forward and backward, on the GEMM directly:
//! the LoRA product is accumulated into the frozen product's output (no `[rows, out]`
//! temporary, no separate scale and add passes), and input gradients of several layers that
//! share an input accumulate into one buffer.

use super::gemm::{gemm, Op, View};
use super::tensor;
use candle_core::{Result, Tensor};

/// A low-rank pair (a LoRA adapter's): `a` is `[r, in]`, `b` is `[out, r]`.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'t> {
    pub a: &'t Tensor,
    pub b: &'t Tensor,
}

/// `y = x Wᵀ + s · (x' Aᵀ) Bᵀ` for `x` `[rows, in]`, `W` `[out, in]`, and `x' Aᵀ` (which the
/// backward needs); `x'` is `lora_x` when given, else `x`. `None` when the inputs are not all
/// contiguous f32 on the CPU.
pub fn linear_forward(
    x: &Tensor,
    w: &Tensor,
    lora: Option<(LowRank<'_>, f64)>,
    lora_x: Option<&Tensor>,
) -> Option<Result<(Tensor, Option<Tensor>)>> {
    let (rows, inp) = x.dims2().ok()?;
    let (out, w_in) = w.dims2().ok()?;
    if w_in != inp {
        return None;
    }
    let (xv, wv) = (View::of(x)?, View::of(w)?);
    let lora = match lora {
        Some((p, s)) => {
            let lx = lora_x.unwrap_or(x);
            let (r, a_in) = p.a.dims2().ok()?;
            if a_in != inp || p.b.dims2().ok()? != (out, r) || lx.dims2().ok()? != (rows, inp) {
                return None;
            }
            Some((View::of(lx)?, View::of(p.a)?, View::of(p.b)?, r, s as f32))
        }
        None => None,
    };
    let mut y = vec![0f32; rows * out];
    gemm(
        rows,
        out,
        inp,
        &mut y,
        false,
        Op::rows(xv.slice(), inp),
        Op::transposed(wv.slice(), inp),
        1.0,
    );
    let xa = match lora {
        None => None,
        Some((lx, a, b, r, s)) => {
            let mut xa = vec![0f32; rows * r];
            gemm(
                rows,
                r,
                inp,
                &mut xa,
                false,
                Op::rows(lx.slice(), inp),
                Op::transposed(a.slice(), inp),
                1.0,
            );
            gemm(
                rows,
                out,
                r,
                &mut y,
                true,
                Op::rows(&xa, r),
                Op::transposed(b.slice(), r),
                s,
            );
            Some((xa, r))
        }
    };
    Some((|| {
        let xa = xa.map(|(v, r)| tensor(v, &[rows, r])).transpose()?;
        Ok((tensor(y, &[rows, out])?, xa))
    })())
}

/// Gradients of one LoRA pair.
pub struct LinearGrads {
    pub da: Tensor,
    pub db: Tensor,
}

/// Backward of [`linear_forward`] (without dropout: `x'` is `x`) given `dy` `[rows, out]`.
///
/// With `dx`, adds `∂/∂x = dY W + s · (dY B) A` into it (a buffer of `rows·in` values, or an
/// empty one to be filled). With `lora = (pair, s, x, xa)`, returns `dA = s·(dY B)ᵀ x` and
/// `dB = s·dYᵀ (x Aᵀ)`. `None` when the inputs are not all contiguous f32 on the CPU.
pub fn linear_backward(
    w: &Tensor,
    dy: &Tensor,
    lora: Option<(LowRank<'_>, f64, &Tensor, &Tensor)>,
    dx: Option<&mut Vec<f32>>,
) -> Option<Result<Option<LinearGrads>>> {
    let (rows, out) = dy.dims2().ok()?;
    let (w_out, inp) = w.dims2().ok()?;
    if w_out != out {
        return None;
    }
    let (dyv, wv) = (View::of(dy)?, View::of(w)?);
    let lora = match lora {
        Some((p, s, x, xa)) => {
            let (r, a_in) = p.a.dims2().ok()?;
            if a_in != inp
                || p.b.dims2().ok()? != (out, r)
                || x.dims2().ok()? != (rows, inp)
                || xa.dims2().ok()? != (rows, r)
            {
                return None;
            }
            Some((
                View::of(p.a)?,
                View::of(p.b)?,
                View::of(x)?,
                View::of(xa)?,
                r,
                s as f32,
            ))
        }
        None => None,
    };
    let dys = Op::rows(dyv.slice(), out);
    let accumulate = match &dx {
        Some(buf) if buf.len() == rows * inp => true,
        Some(buf) if buf.is_empty() => false,
        Some(_) => return None,
        None => false,
    };
    let mut dx = dx;
    if let Some(buf) = dx.as_deref_mut() {
        if !accumulate {
            buf.resize(rows * inp, 0.0);
        }
        gemm(
            rows,
            inp,
            out,
            buf,
            accumulate,
            dys,
            Op::rows(wv.slice(), inp),
            1.0,
        );
    }
    let Some((a, b, x, xa, r, s)) = lora else {
        return Some(Ok(None));
    };
    // dB = s · dYᵀ · xa  ([out, r])
    let mut db = vec![0f32; out * r];
    gemm(
        out,
        r,
        rows,
        &mut db,
        false,
        Op::transposed(dyv.slice(), out),
        Op::rows(xa.slice(), r),
        s,
    );
    // dxa = s · dY · B  ([rows, r])
    let mut dxa = vec![0f32; rows * r];
    gemm(
        rows,
        r,
        out,
        &mut dxa,
        false,
        dys,
        Op::rows(b.slice(), r),
        s,
    );
    // dA = dxaᵀ · x  ([r, in])
    let mut da = vec![0f32; r * inp];
    gemm(
        r,
        inp,
        rows,
        &mut da,
        false,
        Op::transposed(&dxa, r),
        Op::rows(x.slice(), inp),
        1.0,
    );
    if let Some(buf) = dx {
        gemm(
            rows,
            inp,
            r,
            buf,
            true,
            Op::rows(&dxa, r),
            Op::rows(a.slice(), inp),
            1.0,
        );
    }
    Some((|| {
        Ok(Some(LinearGrads {
            da: tensor(da, &[r, inp])?,
            db: tensor(db, &[out, r])?,
        }))
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_rel_diff, rand};

    struct Pair {
        a: Tensor,
        b: Tensor,
    }

    impl Pair {
        fn low(&self) -> LowRank<'_> {
            LowRank {
                a: &self.a,
                b: &self.b,
            }
        }
    }

    fn pair(r: usize, inp: usize, out: usize, seed: u64) -> Pair {
        Pair {
            a: rand(&[r, inp], seed, 0.5),
            b: rand(&[out, r], seed + 1, 0.5),
        }
    }

    // (rows, in, out, rank): odd sizes, and sizes on both sides of the threading threshold.
    const SHAPES: [(usize, usize, usize, usize); 4] = [
        (1, 3, 2, 1),
        (7, 13, 11, 3),
        (61, 96, 80, 8),
        (130, 576, 192, 16),
    ];

    #[test]
    fn forward_matches_composite() {
        for (k, &(rows, inp, out, r)) in SHAPES.iter().enumerate() {
            let seed = 10 * k as u64;
            let x = rand(&[rows, inp], seed, 1.0);
            let w = rand(&[out, inp], seed + 3, 0.3);
            let p = pair(r, inp, out, seed + 5);
            let (y, xa) = linear_forward(&x, &w, Some((p.low(), 2.5)), None)
                .unwrap()
                .unwrap();
            let want_xa = x.matmul(&p.a.t().unwrap()).unwrap();
            let want = (x.matmul(&w.t().unwrap()).unwrap()
                + (want_xa.matmul(&p.b.t().unwrap()).unwrap() * 2.5).unwrap())
            .unwrap();
            assert!(max_rel_diff(&y, &want) < 1e-5, "y {rows}x{inp}->{out} r{r}");
            assert!(max_rel_diff(&xa.unwrap(), &want_xa) < 1e-5);
            let (y, xa) = linear_forward(&x, &w, None, None).unwrap().unwrap();
            assert!(xa.is_none());
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert!(max_rel_diff(&y, &want) < 1e-5);
        }
    }

    #[test]
    fn forward_uses_the_lora_input_when_given() {
        let x = rand(&[5, 9], 1, 1.0);
        let x2 = rand(&[5, 9], 2, 1.0);
        let w = rand(&[4, 9], 3, 0.3);
        let p = pair(2, 9, 4, 4);
        let (y, xa) = linear_forward(&x, &w, Some((p.low(), 0.5)), Some(&x2))
            .unwrap()
            .unwrap();
        let want_xa = x2.matmul(&p.a.t().unwrap()).unwrap();
        let want = (x.matmul(&w.t().unwrap()).unwrap()
            + (want_xa.matmul(&p.b.t().unwrap()).unwrap() * 0.5).unwrap())
        .unwrap();
        assert!(max_rel_diff(&y, &want) < 1e-5);
        assert!(max_rel_diff(&xa.unwrap(), &want_xa) < 1e-5);
    }

    #[test]
    fn backward_matches_composite_and_accumulates() {
        for (k, &(rows, inp, out, r)) in SHAPES.iter().enumerate() {
            let seed = 100 + 10 * k as u64;
            let x = rand(&[rows, inp], seed, 1.0);
            let w = rand(&[out, inp], seed + 3, 0.3);
            let p = pair(r, inp, out, seed + 5);
            let dy = rand(&[rows, out], seed + 7, 1.0);
            let s = 1.5;
            let xa = x.matmul(&p.a.t().unwrap()).unwrap();
            let prior = rand(&[rows, inp], seed + 9, 1.0);
            let mut buf = prior.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = linear_backward(&w, &dy, Some((p.low(), s, &x, &xa)), Some(&mut buf))
                .unwrap()
                .unwrap()
                .unwrap();
            // Composite oracle.
            let want_db = (dy.t().unwrap().matmul(&xa).unwrap() * s).unwrap();
            let dxa = (dy.matmul(&p.b).unwrap() * s).unwrap();
            let want_da = dxa.t().unwrap().matmul(&x).unwrap();
            let want_dx =
                ((dy.matmul(&w).unwrap() + dxa.matmul(&p.a).unwrap()).unwrap() + &prior).unwrap();
            let dx = Tensor::from_vec(buf, (rows, inp), &candle_core::Device::Cpu).unwrap();
            assert!(
                max_rel_diff(&g.da, &want_da) < 1e-5,
                "dA {rows}x{inp}->{out} r{r}"
            );
            assert!(max_rel_diff(&g.db, &want_db) < 1e-5, "dB");
            assert!(max_rel_diff(&dx, &want_dx) < 1e-5, "dX accumulated");
            // An empty buffer is filled; no LoRA gives no pair gradients.
            let mut fresh = vec![];
            assert!(linear_backward(&w, &dy, None, Some(&mut fresh))
                .unwrap()
                .unwrap()
                .is_none());
            let fresh = Tensor::from_vec(fresh, (rows, inp), &candle_core::Device::Cpu).unwrap();
            assert!(max_rel_diff(&fresh, &dy.matmul(&w).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn declines_mismatched_or_foreign_inputs() {
        let x = rand(&[3, 4], 1, 1.0);
        let w = rand(&[5, 6], 2, 1.0);
        assert!(
            linear_forward(&x, &w, None, None).is_none(),
            "in features differ"
        );
        let w = rand(&[5, 4], 2, 1.0);
        let xt = rand(&[4, 3], 3, 1.0).t().unwrap();
        assert!(
            linear_forward(&xt, &w, None, None).is_none(),
            "non-contiguous"
        );
        let x64 = x.to_dtype(candle_core::DType::F64).unwrap();
        assert!(linear_forward(&x64, &w, None, None).is_none(), "f64");
        let mut wrong = vec![0f32; 5];
        let dy = rand(&[3, 5], 4, 1.0);
        assert!(linear_backward(&w, &dy, None, Some(&mut wrong)).is_none());
    }
}
