//! The LM head with cross-entropy and its gradient, on one chunk of scored rows, in place:
//! the `[rows, vocab]` logits become the probabilities and then the logits' gradient in the
//! same buffer, so one such buffer exists at a time (candle's ops made six passes over it and
//! held two).

use super::gemm::{gemm, Op, View};
use super::par::for_rows2;
use super::{exp, tensor};
use candle_core::{Result, Tensor};

multiversion! {
    /// `row ← coef · (softmax(row) − onehot(target))`; writes the row's cross-entropy to `ce`.
    fn ce_row(row: &mut [f32], ce: &mut [f32], target: usize, coef: f32) {
        let picked = row[target];
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for k in 0..8 {
                lanes[k] = if c[k] > lanes[k] { c[k] } else { lanes[k] };
            }
        }
        let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for k in 0..8 {
                c[k] = exp(c[k] - max);
                sums[k] += c[k];
            }
        }
        let mut sum = sums.iter().map(|&s| s as f64).sum::<f64>();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x as f64;
        }
        ce[0] = (max as f64 + sum.ln() - picked as f64) as f32;
        let c = (coef as f64 / sum) as f32;
        for x in row.iter_mut() {
            *x *= c;
        }
        row[target] -= coef;
    }
}

/// For final hidden states `h` (`[n, H]`, normed) and the head `w` (`[V, H]`): each row's
/// cross-entropy against `targets` and `∂/∂h` of `Σᵢ coefᵢ · CEᵢ`, i.e. `dlogits · w` with
/// `dlogits = coef · (softmax(h wᵀ) − onehot(target))`. `None` when the inputs are not
/// contiguous f32 on the CPU or do not match.
pub fn cross_entropy_head(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    coef: &[f32],
) -> Option<Result<(Vec<f32>, Tensor)>> {
    let vocab = w.dims2().ok()?.0;
    let done = cross_entropy_head_sliced(h, &[(0, vocab)], |_| Ok(w.clone()), targets, Some(coef))?;
    Some(done.map(|(ce, dh)| (ce, dh.expect("a gradient was asked for"))))
}

/// As [`cross_entropy_head`] for a head given as row slices `(first row, rows)` that
/// `slice(i)` makes dense on demand (a quantized head dequantizes them): each is made, used
/// and dropped twice, for the logits and for `∂/∂h`, so only one exists at a time. Without
/// `coef`, the cross-entropies alone, computed as with it (no `∂/∂h`, the slices made once):
/// a score without a gradient (a reference, a validation) then equals the training step's to
/// the last bit, so DPO's first step, where the policy is the reference, has a margin of 0.
pub fn cross_entropy_head_sliced(
    h: &Tensor,
    slices: &[(usize, usize)],
    slice: impl Fn(usize) -> Result<Tensor>,
    targets: &[u32],
    coef: Option<&[f32]>,
) -> Option<Result<(Vec<f32>, Option<Tensor>)>> {
    let (n, hidden) = h.dims2().ok()?;
    let vocab = slices.last().map_or(0, |&(s0, len)| s0 + len);
    if vocab == 0
        || slices
            .iter()
            .scan(0, |next, &(s0, len)| {
                let ok = s0 == *next;
                *next = s0 + len;
                Some(ok)
            })
            .any(|ok| !ok)
        || targets.len() != n
        || coef.is_some_and(|c| c.len() != n)
        || targets.iter().any(|&t| t as usize >= vocab)
    {
        return None;
    }
    let hv = View::of(h)?;
    let hs = hv.slice();
    let mut logits = vec![0f32; n * vocab];
    let mut part = vec![];
    for (i, &(s0, len)) in slices.iter().enumerate() {
        let w = match slice(i) {
            Ok(w) => w,
            Err(e) => return Some(Err(e)),
        };
        if w.dims() != [len, hidden] {
            return None;
        }
        let wv = View::of(&w)?;
        let (lhs, wt) = (Op::rows(hs, hidden), Op::transposed(wv.slice(), hidden));
        if slices.len() == 1 {
            gemm(n, vocab, hidden, &mut logits, false, lhs, wt, 1.0);
        } else {
            part.resize(n * len, 0f32);
            gemm(n, len, hidden, &mut part, false, lhs, wt, 1.0);
            for (dst, src) in logits.chunks_exact_mut(vocab).zip(part.chunks_exact(len)) {
                dst[s0..s0 + len].copy_from_slice(src);
            }
        }
    }
    drop(part);
    let mut ce = vec![0f32; n];
    // Without a gradient the rows are scaled by 0, which leaves each CE as it is.
    for_rows2(&mut logits, vocab, &mut ce, 1, |i, row, ce| {
        ce_row(row, ce, targets[i] as usize, coef.map_or(0.0, |c| c[i]));
    });
    if coef.is_none() {
        return Some(Ok((ce, None)));
    }
    let mut dh = vec![0f32; n * hidden];
    for (i, &(s0, len)) in slices.iter().enumerate() {
        let w = match slice(i) {
            Ok(w) => w,
            Err(e) => return Some(Err(e)),
        };
        let wv = View::of(&w)?;
        let dl = Op {
            data: &logits[s0..],
            rs: vocab,
            cs: 1,
        };
        gemm(
            n,
            hidden,
            len,
            &mut dh,
            i > 0,
            dl,
            Op::rows(wv.slice(), hidden),
            1.0,
        );
    }
    drop(logits);
    Some(tensor(dh, &[n, hidden]).map(|dh| (ce, Some(dh))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_rel_diff, rand};
    use candle_core::{Device, Var, D};

    #[test]
    fn loss_and_gradient_match_autograd() {
        // (rows, hidden, vocab): odd sizes, a vocabulary too wide for one thread's block.
        for (k, &(n, hidden, vocab)) in [(1, 3, 5), (7, 16, 129), (33, 64, 5000)].iter().enumerate()
        {
            let seed = 10 * k as u64;
            let h = rand(&[n, hidden], seed, 2.0);
            let w = rand(&[vocab, hidden], seed + 1, 1.0);
            let targets: Vec<u32> = (0..n).map(|i| ((i * 7919 + k) % vocab) as u32).collect();
            let coef: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 / n as f32).collect();
            let (ce, dh) = cross_entropy_head(&h, &w, &targets, &coef)
                .unwrap()
                .unwrap();
            let hv = Var::from_tensor(&h).unwrap();
            let logits = hv.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let max = logits.max_keepdim(D::Minus1).unwrap();
            let lse = (logits
                .broadcast_sub(&max)
                .unwrap()
                .exp()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap()
                .log()
                .unwrap()
                + max)
                .unwrap();
            let t = Tensor::from_vec(targets.clone(), (n, 1), &Device::Cpu).unwrap();
            let want_ce = (lse - logits.gather(&t, D::Minus1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap();
            let c = Tensor::from_vec(coef.clone(), n, &Device::Cpu).unwrap();
            let g = (&want_ce * c)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let got_ce = Tensor::from_vec(ce, n, &Device::Cpu).unwrap();
            assert!(
                max_rel_diff(&got_ce, &want_ce) < 1e-5,
                "ce {n}x{hidden}x{vocab}"
            );
            assert!(
                max_rel_diff(&dh, g.get(hv.as_tensor()).unwrap()) < 1e-5,
                "dh {n}x{hidden}x{vocab}"
            );
            // Without the gradient: the same cross-entropies, bit for bit.
            let alone =
                cross_entropy_head_sliced(&h, &[(0, vocab)], |_| Ok(w.clone()), &targets, None);
            let (alone, none) = alone.unwrap().unwrap();
            assert!(none.is_none());
            assert_eq!(alone, got_ce.to_vec1::<f32>().unwrap());
        }
    }

    #[test]
    fn a_head_in_slices_gives_the_same_loss_and_gradient() {
        let (n, hidden, vocab) = (9, 32, 1000);
        let h = rand(&[n, hidden], 3, 2.0);
        let w = rand(&[vocab, hidden], 4, 1.0);
        let targets: Vec<u32> = (0..n).map(|i| (i * 337 % vocab) as u32).collect();
        let coef = vec![1.0f32; n];
        let (ce, dh) = cross_entropy_head(&h, &w, &targets, &coef)
            .unwrap()
            .unwrap();
        let slices = [(0, 384), (384, 384), (768, 232)];
        let (ce2, dh2) = cross_entropy_head_sliced(
            &h,
            &slices,
            |i| w.narrow(0, slices[i].0, slices[i].1)?.contiguous(),
            &targets,
            Some(&coef),
        )
        .unwrap()
        .unwrap();
        let dh2 = dh2.unwrap();
        for (a, b) in ce.iter().zip(&ce2) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(max_rel_diff(&dh, &dh2) < 1e-5);
        // Slices that leave a gap are declined.
        let gap = [(0, 384), (400, 600)];
        let f = |i: usize| w.narrow(0, gap[i].0, gap[i].1);
        assert!(cross_entropy_head_sliced(&h, &gap, f, &targets, Some(&coef)).is_none());
    }

    #[test]
    fn declines_targets_outside_the_vocabulary() {
        let h = rand(&[2, 4], 1, 1.0);
        let w = rand(&[6, 4], 2, 1.0);
        assert!(cross_entropy_head(&h, &w, &[1, 6], &[1.0, 1.0]).is_none());
        assert!(
            cross_entropy_head(&h, &w, &[1], &[1.0]).is_none(),
            "one target for two rows"
        );
    }
}
