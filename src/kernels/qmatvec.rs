//! `x·Wᵀ` straight from GGML blocks, for the few rows of decoding (one new token per
//! sequence): each block of a weight row is expanded in registers to the exact f32 values a
//! dequantization gives (`q·d + m`, `(q − 8)·d`, `q·d`), and dotted with every row of `x` while
//! it is there. The weight is read once per product at its stored size (4.5 to 8.5 bits a
//! weight) instead of being dequantized to an f32 copy first: decoding is bound by reading the
//! weights, so this is what makes a quantized model decode fast. The result equals the dense
//! product on the dequantized matrix up to the order of the sums.

use super::par;
use candle_core::quantized::GgmlDType;
use half::f16;

/// Rows of `x` up to which the block path is taken; above it (a prompt), dequantizing a slice
/// and running the GEMM is faster.
pub const MAX_ROWS: usize = 8;

/// Bytes of one block of each covered type.
fn block_bytes(dt: GgmlDType) -> Option<usize> {
    match dt {
        GgmlDType::Q4_0 => Some(18),
        GgmlDType::Q4_1 => Some(20),
        GgmlDType::Q8_0 => Some(34),
        _ => None,
    }
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One block's 32 values, as dequantization gives them.
#[inline(always)]
fn expand(dt: GgmlDType, b: &[u8], w: &mut [f32; 32]) {
    match dt {
        GgmlDType::Q4_1 => {
            let (d, m) = (half(b, 0), half(b, 2));
            let qs = &b[4..20];
            for i in 0..16 {
                w[i] = (qs[i] & 15) as f32 * d + m;
                w[i + 16] = (qs[i] >> 4) as f32 * d + m;
            }
        }
        GgmlDType::Q4_0 => {
            let d = half(b, 0);
            let qs = &b[2..18];
            for i in 0..16 {
                w[i] = ((qs[i] & 15) as i32 - 8) as f32 * d;
                w[i + 16] = ((qs[i] >> 4) as i32 - 8) as f32 * d;
            }
        }
        _ => {
            let d = half(b, 0);
            for (o, &q) in w.iter_mut().zip(&b[2..34]) {
                *o = (q as i8) as f32 * d;
            }
        }
    }
}

multiversion! {
    /// Rows `rows` of `x·Wᵀ` for `n` rows of `x` (`[n, cols]`), `W`'s rows in `w` (blocks of
    /// `dt`), written to `out[j·stride + r]`.
    fn rows_of(
        dt: GgmlDType,
        w: &[u8],
        row_bytes: usize,
        x: &[f32],
        n: usize,
        cols: usize,
        rows: std::ops::Range<usize>,
        out: par::SendPtr,
        stride: usize,
    ) {
        let bb = row_bytes / (cols / 32);
        let mut vals = [0f32; 32];
        for r in rows {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            let mut acc = [[0f32; 8]; MAX_ROWS];
            for (k, b) in row.chunks_exact(bb).enumerate() {
                expand(dt, b, &mut vals);
                for (j, a) in acc.iter_mut().enumerate().take(n) {
                    let xs = &x[j * cols + k * 32..j * cols + k * 32 + 32];
                    for c in 0..4 {
                        for l in 0..8 {
                            a[l] += vals[c * 8 + l] * xs[c * 8 + l];
                        }
                    }
                }
            }
            for (j, a) in acc.iter().enumerate().take(n) {
                // SAFETY: element (j, r) of the output lies inside it, and row r is this
                // call's alone.
                unsafe { *out.0.add(j * stride + r) = a.iter().sum() };
            }
        }
    }
}

/// A `[rows, cols]` matrix stored as GGML blocks of `dt`, row after row.
pub struct Blocks<'a> {
    pub dt: GgmlDType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

/// `out[j·stride + r] = Σ_c x[j, c]·W[r, c]` for the rows of `w` and the `n ≤ MAX_ROWS` rows of
/// `x` (`[n, cols]`); `out` holds at least `(n − 1)·stride + rows` values. False (nothing
/// written) for a block type it does not cover or a shape that does not fit.
pub fn qmatvec(w: &Blocks, x: &[f32], n: usize, out: &mut [f32], stride: usize) -> bool {
    let Blocks {
        dt,
        bytes,
        rows,
        cols,
    } = *w;
    let Some(bb) = block_bytes(dt) else {
        return false;
    };
    if n == 0
        || n > MAX_ROWS
        || !cols.is_multiple_of(32)
        || bytes.len() != rows * (cols / 32) * bb
        || x.len() < n * cols
        || stride < rows
        || out.len() < (n - 1) * stride + rows
    {
        return false;
    }
    let row_bytes = (cols / 32) * bb;
    let p = par::SendPtr::of(out);
    par::for_chunks(rows, rows * cols * n, |r| {
        rows_of(dt, bytes, row_bytes, x, n, cols, r, p, stride)
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::rand;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// Against the dense product on candle's own dequantization of the same blocks.
    #[test]
    fn equals_the_product_on_the_dequantized_matrix() {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (rows, cols, n) in [(37, 64, 1), (8, 96, 3), (130, 576, 8)] {
                let w = rand(&[rows, cols], 1, 1.0);
                let q = QTensor::quantize(&w, dt).unwrap();
                let dense = q.dequantize(&dev).unwrap();
                let xt = rand(&[n, cols], 2, 1.0);
                let x: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
                let want: Vec<f32> = xt
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bytes = q.data().unwrap();
                // Written into a wider output (a slice of a larger matrix's columns).
                let stride = rows + 5;
                let mut out = vec![f32::NAN; n * stride];
                let w = Blocks {
                    dt,
                    bytes: &bytes,
                    rows,
                    cols,
                };
                assert!(qmatvec(&w, &x, n, &mut out, stride));
                for j in 0..n {
                    for r in 0..rows {
                        let (a, b) = (out[j * stride + r], want[j * rows + r]);
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{dt:?} {rows}x{cols} row {j},{r}: {a} vs {b}"
                        );
                    }
                }
            }
        }
        // Not covered: another type, too many rows, a ragged row.
        let mut out = vec![0f32; 64];
        let w = |dt, bytes, cols| Blocks {
            dt,
            bytes,
            rows: 1,
            cols,
        };
        let q8 = [0u8; 34];
        assert!(!qmatvec(
            &w(GgmlDType::Q4K, &[], 256),
            &[0.0; 256],
            1,
            &mut out,
            1
        ));
        assert!(!qmatvec(
            &w(GgmlDType::Q8_0, &q8, 32),
            &[0.0; 320],
            9,
            &mut out,
            1
        ));
        assert!(!qmatvec(
            &w(GgmlDType::Q8_0, &q8, 33),
            &[0.0; 33],
            1,
            &mut out,
            1
        ));
    }
}
