//! `x·Wᵀ` for a prompt's rows straight from GGML blocks, exactly: a few weight rows at a time
//! are dequantized (by candle's own `to_float`, so the values are those of the dequantized
//! matrix, bit for bit) into a buffer that stays in cache, and every row of `x` is dotted with
//! them in f32 ([`super::matvec`]'s row kernel) before the next rows are read. The blocks are
//! read once at their stored size and no dense copy of the matrix is made, where the GEMM path
//! writes and reads back an f32 copy (8 bytes a weight where a Q4 block holds 0.56). Unlike
//! decoding's [`super::qmatvec`], `x` is not rounded: a prompt's keys and values, and so the
//! reply, are the dequantized model's (rounding a prompt to 8 bits turns SmolLM2 Q4_1's
//! answer to the capital of France from "Paris" to "L'Étoile").

use super::matvec::{self, Rows};
use super::par;
use super::qmatvec::Blocks;
use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::GgmlDType;

/// Rows of `x` up to which a prompt takes this path; past it, dequantizing the matrix for the
/// GEMM (whose register blocking does more per weight) is faster. SmolLM2 Q4_1 on 2 cores
/// (AVX-512): a prompt of 14 / 28 / 42 tokens took 0.10 / 0.13 / 0.22 s here against 0.15 /
/// 0.16 / 0.20 s dequantized for the GEMM.
pub const MAX_ROWS: usize = 32;

/// Weights dequantized at a time, per thread (64 KB: in cache while every row of `x` passes).
const TILE: usize = 16 * 1024;

/// Whether [`matmul_rows`] reads blocks of `dt` (every GGML block format candle dequantizes).
pub fn covers(dt: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dt,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// `out[j·stride + at + r] = Σ_c x[j, c]·W[r, c]` for every row `r` of `w` and the `n` rows of
/// `x` (`[n, cols]`). False (nothing written) for a format it does not read, blocks that are
/// not whole rows at their type's alignment, or an output too small.
pub fn matmul_rows(
    w: &Blocks,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    at: usize,
    stride: usize,
) -> bool {
    if n == 0 || w.rows == 0 || w.cols == 0 || x.len() != n * w.cols {
        return false;
    }
    if at + w.rows > stride || out.len() < (n - 1) * stride + at + w.rows {
        return false;
    }
    let p = par::SendPtr::of(out);
    // SAFETY (for `rows`): the output's rows start inside `out` (checked above).
    let o = unsafe { p.add(at) };
    macro_rules! by_type {
        ($($dt:ident => $t:ty),*) => {
            match w.dt {
                $(GgmlDType::$dt => rows::<$t>(w, x, n, o, stride),)*
                _ => false,
            }
        };
    }
    by_type!(
        Q4_0 => kq::BlockQ4_0, Q4_1 => kq::BlockQ4_1, Q5_0 => kq::BlockQ5_0,
        Q5_1 => kq::BlockQ5_1, Q8_0 => kq::BlockQ8_0, Q2K => kq::BlockQ2K,
        Q3K => kq::BlockQ3K, Q4K => kq::BlockQ4K, Q5K => kq::BlockQ5K, Q6K => kq::BlockQ6K
    )
}

/// [`matmul_rows`] for blocks of `T`.
fn rows<T: GgmlType + Sync>(
    w: &Blocks,
    x: &[f32],
    n: usize,
    out: par::SendPtr,
    stride: usize,
) -> bool {
    let Some(blocks) = as_blocks::<T>(w) else {
        return false;
    };
    let (rows, cols) = (w.rows, w.cols);
    let per_row = cols / T::BLCK_SIZE;
    let tile = (TILE / cols).clamp(1, rows);
    par::for_chunks(rows.div_ceil(tile), rows * cols * n, |tiles| {
        let mut buf = vec![0f32; tile * cols];
        for t in tiles {
            let (first, k) = (t * tile, tile.min(rows - t * tile));
            let dense = &mut buf[..k * cols];
            T::to_float(&blocks[first * per_row..(first + k) * per_row], dense);
            for pass in (0..n).step_by(matvec::MAX_ROWS) {
                let m = matvec::MAX_ROWS.min(n - pass);
                // SAFETY: rows `pass..pass + m` of the output, columns `first..first + k` are
                // this tile's alone, inside `out` (checked by `matmul_rows`).
                let o = unsafe { out.add(pass * stride + first) };
                let xs = &x[pass * cols..(pass + m) * cols];
                matvec::rows_of(Rows::F32(dense), xs, m, 0..k, o, stride);
            }
        }
    });
    true
}

/// `w`'s bytes as whole rows of blocks of `T`, when they are.
fn as_blocks<'a, T: GgmlType>(w: &Blocks<'a>) -> Option<&'a [T]> {
    let size = std::mem::size_of::<T>();
    let whole = w.dt == T::DTYPE
        && w.cols.is_multiple_of(T::BLCK_SIZE)
        && w.bytes.len() == w.rows * (w.cols / T::BLCK_SIZE) * size
        && (w.bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
    // SAFETY: the bytes are whole blocks of `T` at its alignment (checked above), as the
    // `Vec<T>` behind a CPU QTensor holds them; GGML block types are plain `repr(C)` data.
    whole.then(|| unsafe {
        std::slice::from_raw_parts(w.bytes.as_ptr().cast::<T>(), w.bytes.len() / size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::rand;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    fn values(t: &candle_core::Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Against the f64 product on candle's own dequantization of the same blocks (so to float
    /// rounding, with no rounding of x), for legacy and k-quant formats, one pass and several,
    /// one tile and several; placed at a column offset inside a wider output.
    #[test]
    fn equals_the_product_on_the_dequantized_matrix() {
        let dev = Device::Cpu;
        let cases = [
            (GgmlDType::Q4_0, 37, 64),
            (GgmlDType::Q4_1, 130, 576),
            (GgmlDType::Q8_0, 9, 32),
            (GgmlDType::Q5_1, 20, 96),
            (GgmlDType::Q4K, 70, 256),
            (GgmlDType::Q6K, 3, 512),
        ];
        for (dt, rows, cols) in cases {
            let q = QTensor::quantize(&rand(&[rows, cols], 1, 1.0), dt).unwrap();
            let dense = values(&q.dequantize(&dev).unwrap());
            let bytes = q.data().unwrap();
            let w = Blocks {
                dt,
                bytes: &bytes,
                rows,
                cols,
            };
            for n in [1, 2, 8, 9, 21] {
                let x = values(&rand(&[n, cols], 2, 1.0));
                let (at, stride) = (5, rows + 11);
                let mut out = vec![f32::NAN; n * stride];
                assert!(matmul_rows(&w, &x, n, &mut out, at, stride), "{dt:?}");
                for j in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| dense[r * cols + c] as f64 * x[j * cols + c] as f64)
                            .sum();
                        let got = out[j * stride + at + r] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{dt:?} n={n}"
                        );
                    }
                    // Nothing outside the weight's columns is written.
                    assert!(out[j * stride..j * stride + at].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_does_not_cover() {
        let q = QTensor::quantize(&rand(&[4, 64], 1, 1.0), GgmlDType::Q4_1).unwrap();
        let bytes = q.data().unwrap();
        let w = |dt, rows, cols| Blocks {
            dt,
            bytes: &bytes,
            rows,
            cols,
        };
        let x = vec![0.5f32; 2 * 64];
        let mut out = vec![0f32; 2 * 4];
        // A format it does not read, bytes that are not the shape's, n against x, no room.
        assert!(!matmul_rows(
            &w(GgmlDType::F16, 4, 64),
            &x,
            2,
            &mut out,
            0,
            4
        ));
        assert!(!matmul_rows(
            &w(GgmlDType::Q4_1, 4, 32),
            &x,
            2,
            &mut out,
            0,
            4
        ));
        assert!(!matmul_rows(
            &w(GgmlDType::Q4_1, 4, 64),
            &x,
            3,
            &mut out,
            0,
            4
        ));
        assert!(!matmul_rows(
            &w(GgmlDType::Q4_1, 4, 64),
            &x,
            2,
            &mut out,
            1,
            4
        ));
        assert!(!matmul_rows(
            &w(GgmlDType::Q4_1, 4, 64),
            &x,
            2,
            &mut out[1..],
            0,
            4
        ));
        assert!(out.iter().all(|&v| v == 0.0));
        assert!(matmul_rows(
            &w(GgmlDType::Q4_1, 4, 64),
            &x,
            2,
            &mut out,
            0,
            4
        ));
        assert!(!covers(GgmlDType::F32) && covers(GgmlDType::Q6K));
    }
}
