//! `x·Wᵀ` straight from GGML blocks, for the few rows of decoding (one new token per
//! sequence), as llama.cpp computes it: each row of `x` is quantized to 8 bits per block of 32
//! (a scale per block), and each weight block is dotted with it in integers, one scale product
//! per block. The weight is read once per product at its stored size (4.5 to 8.5 bits a
//! weight) instead of being dequantized to an f32 copy first, and the arithmetic is a few
//! integer instructions per 32 weights. The result differs from the dense product on the
//! dequantized matrix by the rounding of `x` to 8 bits (about 0.4% of each block's largest
//! entry): the same rounding llama.cpp's CPU kernels make.

use super::par;
use candle_core::quantized::GgmlDType;
use half::f16;

/// Rows of `x` up to which this kernel reads the blocks; decoding gives it one new token's
/// row (a prompt's rows are multiplied exactly, [`super::qrows`]).
pub const MAX_ROWS: usize = 8;

/// Whether [`qmatvec`] reads blocks of `dt`.
pub fn covers(dt: GgmlDType) -> bool {
    block_bytes(dt).is_some()
}

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

/// Rows of `x` at 8 bits: per block of 32, `x ≈ d·q` with `q` in [−127, 127], and
/// `s = d·Σq` (what a block's offset `m` multiplies).
pub struct QuantizedX {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

/// `n` rows of `cols` (a multiple of 32) quantized by blocks of 32.
pub fn quantize_x(x: &[f32], n: usize, cols: usize) -> QuantizedX {
    let blocks = n * cols / 32;
    let mut out = QuantizedX {
        q: vec![0; n * cols],
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
    };
    quantize_blocks(&x[..n * cols], &mut out);
    out
}

multiversion! {
    /// [`quantize_x`]'s loop; rounding to nearest-even vectorizes, where `round` is a call.
    fn quantize_blocks(x: &[f32], out: &mut QuantizedX) {
        for (k, (xs, qs)) in x.chunks_exact(32).zip(out.q.chunks_exact_mut(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = (v * inv).round_ties_even() as i8;
                sum += *q as i32;
            }
            out.d[k] = d;
            out.s[k] = d * sum as f32;
        }
    }
}

/// One weight block (at `b`) against one block of `x` (`q`, scale `d`, `s = d·Σq`).
#[inline(always)]
fn block_dot(dt: GgmlDType, b: &[u8], q: &[i8], d: f32, s: f32) -> f32 {
    match dt {
        GgmlDType::Q4_1 => {
            let (wd, wm) = (half(b, 0), half(b, 2));
            let qs = &b[4..20];
            let mut acc = 0i32;
            for i in 0..16 {
                acc += (qs[i] & 15) as i32 * q[i] as i32 + (qs[i] >> 4) as i32 * q[i + 16] as i32;
            }
            wd * d * acc as f32 + wm * s
        }
        GgmlDType::Q4_0 => {
            let wd = half(b, 0);
            let qs = &b[2..18];
            let mut acc = 0i32;
            for i in 0..16 {
                acc += (qs[i] & 15) as i32 * q[i] as i32 + (qs[i] >> 4) as i32 * q[i + 16] as i32;
            }
            // (w − 8)·x summed: Σ w·x − 8·Σ x.
            wd * (d * acc as f32 - 8.0 * s)
        }
        _ => {
            let wd = half(b, 0);
            let mut acc = 0i32;
            for (&w, &v) in b[2..34].iter().zip(q) {
                acc += (w as i8) as i32 * v as i32;
            }
            wd * d * acc as f32
        }
    }
}

/// Rows `rows` of the product, portable.
#[allow(clippy::too_many_arguments)]
fn rows_of(
    dt: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    x: &QuantizedX,
    n: usize,
    cols: usize,
    rows: std::ops::Range<usize>,
    out: par::SendPtr,
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU was just checked for the features `avx2::rows_of` is compiled with.
        return unsafe { avx2::rows_of(dt, w, row_bytes, x, n, cols, rows, out, stride) };
    }
    rows_portable(dt, w, row_bytes, x, n, cols, rows, out, stride)
}

/// [`rows_of`] without SIMD (and the oracle the SIMD version is tested against).
#[allow(clippy::too_many_arguments)]
fn rows_portable(
    dt: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    x: &QuantizedX,
    n: usize,
    cols: usize,
    rows: std::ops::Range<usize>,
    out: par::SendPtr,
    stride: usize,
) {
    let bb = row_bytes / (cols / 32);
    let per_row = cols / 32;
    for r in rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for j in 0..n {
            let mut sum = 0f32;
            for (k, b) in row.chunks_exact(bb).enumerate() {
                let xb = j * per_row + k;
                sum += block_dot(dt, b, &x.q[xb * 32..xb * 32 + 32], x.d[xb], x.s[xb]);
            }
            // SAFETY: element (j, r) lies inside the output, and row r is this call's alone.
            unsafe { *out.0.add(j * stride + r) = sum };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{par, GgmlDType, QuantizedX};
    use crate::kernels::hsum;
    use std::arch::x86_64::*;

    /// The f16 at `p`.
    #[inline(always)]
    unsafe fn half(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }

    /// The 32 weights of a 4-bit block as unsigned bytes 0..15, in `x`'s order: the low
    /// nibbles are elements 0..16, the high ones 16..32.
    #[inline(always)]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let b = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(15);
        let lo = _mm_and_si128(b, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Σ w·x over 32 unsigned `w` and signed `x` bytes, as 8 partial i32 sums in f32.
    #[inline(always)]
    unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// As `super::rows_of`, with AVX2: one 256-bit multiply-add chain per block and row of
    /// x, the rows of x a constant so that their sums stay in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_of(
        dt: GgmlDType,
        w: &[u8],
        row_bytes: usize,
        x: &QuantizedX,
        n: usize,
        cols: usize,
        rows: std::ops::Range<usize>,
        out: par::SendPtr,
        stride: usize,
    ) {
        macro_rules! by_n {
            ($($n:literal)*) => {
                match n {
                    $($n => match dt {
                        GgmlDType::Q8_0 => rows_n::<$n, 0>(w, row_bytes, x, cols, rows, out, stride),
                        GgmlDType::Q4_1 => rows_n::<$n, 1>(w, row_bytes, x, cols, rows, out, stride),
                        _ => rows_n::<$n, 2>(w, row_bytes, x, cols, rows, out, stride),
                    },)*
                    _ => unreachable!("at most MAX_ROWS rows"),
                }
            };
        }
        by_n!(1 2 3 4 5 6 7 8)
    }

    /// `N` rows of x against the rows `rows` of W in format `F` (0: Q8_0, 1: Q4_1, 2: Q4_0).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_n<const N: usize, const F: u8>(
        w: &[u8],
        row_bytes: usize,
        x: &QuantizedX,
        cols: usize,
        rows: std::ops::Range<usize>,
        out: par::SendPtr,
        stride: usize,
    ) {
        let per_row = cols / 32;
        let bb = row_bytes / per_row;
        // One block of the row against the N rows of x, into `acc` and `offset`.
        #[inline(always)]
        unsafe fn block<const N: usize, const F: u8>(
            b: *const u8,
            k: usize,
            per_row: usize,
            (xq, xd, xs): (*const i8, *const f32, *const f32),
            acc: &mut [__m256; N],
            offset: &mut [__m256; N],
        ) {
            let wd = half(b);
            if F == 0 {
                let wv = _mm256_loadu_si256(b.add(2) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                for (j, a) in acc.iter_mut().enumerate() {
                    let xb = j * per_row + k;
                    let xv = _mm256_loadu_si256(xq.add(xb * 32) as *const __m256i);
                    let p = dot_u8_i8(aw, _mm256_sign_epi8(xv, wv));
                    *a = _mm256_fmadd_ps(p, _mm256_set1_ps(wd * *xd.add(xb)), *a);
                }
            } else {
                let wv = nibbles(b.add(if F == 1 { 4 } else { 2 }));
                // Q4_1's offset m, or Q4_0's −8·d: it multiplies d_x·Σq_x.
                let wm = if F == 1 { half(b.add(2)) } else { -8.0 * wd };
                for j in 0..N {
                    let xb = j * per_row + k;
                    let xv = _mm256_loadu_si256(xq.add(xb * 32) as *const __m256i);
                    let p = dot_u8_i8(wv, xv);
                    acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(wd * *xd.add(xb)), acc[j]);
                    // Kept in lane 0 of a vector: no scalar dependency chain.
                    offset[j] = _mm256_fmadd_ps(
                        _mm256_set1_ps(wm),
                        _mm256_zextps128_ps256(_mm_set_ss(*xs.add(xb))),
                        offset[j],
                    );
                }
            }
        }
        let xp = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
        for r in rows {
            let row = w.as_ptr().add(r * row_bytes);
            // Two sets of sums, for even and odd blocks: two independent chains of FMAs.
            let (mut a0, mut a1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
            let (mut o0, mut o1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
            let mut k = 0;
            while k + 1 < per_row {
                block::<N, F>(row.add(k * bb), k, per_row, xp, &mut a0, &mut o0);
                block::<N, F>(row.add((k + 1) * bb), k + 1, per_row, xp, &mut a1, &mut o1);
                k += 2;
            }
            if k < per_row {
                block::<N, F>(row.add(k * bb), k, per_row, xp, &mut a0, &mut o0);
            }
            for j in 0..N {
                let sum = _mm256_add_ps(_mm256_add_ps(a0[j], a1[j]), _mm256_add_ps(o0[j], o1[j]));
                *out.0.add(j * stride + r) = hsum(sum);
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
/// `x` (already quantized by [`quantize_x`]); `out` holds at least `(n − 1)·stride + rows`
/// values. False (nothing written) for a block type it does not cover or a shape that does
/// not fit.
pub fn qmatvec(w: &Blocks, x: &QuantizedX, n: usize, out: &mut [f32], stride: usize) -> bool {
    let Some(row_bytes) = fits(w, x, n) else {
        return false;
    };
    if stride < w.rows || out.len() < (n - 1) * stride + w.rows {
        return false;
    }
    let p = par::SendPtr::of(out);
    par::for_chunks(w.rows, w.rows * w.cols * n, |r| {
        rows_of(w.dt, w.bytes, row_bytes, x, n, w.cols, r, p, stride)
    });
    true
}

/// `out[at + r] = W·x` for every row `r` of each `(W, at)` of `parts` and the one row of `x`:
/// several products over the same input (decoding's q, k and v; gate and up; a sliced
/// matrix's slices) as one parallel dispatch over all their rows, so the pool wakes once.
/// False (nothing written) when a part is not covered, does not fit in `out`, or two parts'
/// outputs overlap.
pub fn qmatvec_parts(parts: &[(Blocks, usize)], x: &QuantizedX, out: &mut [f32]) -> bool {
    let mut row_bytes = Vec::with_capacity(parts.len());
    for (w, at) in parts {
        match fits(w, x, 1) {
            Some(rb) if at + w.rows <= out.len() => row_bytes.push(rb),
            _ => return false,
        }
    }
    if !par::disjoint(parts.iter().map(|(w, at)| *at..at + w.rows)) {
        return false;
    }
    let total: usize = parts.iter().map(|(w, _)| w.rows).sum();
    let work: usize = parts.iter().map(|(w, _)| w.rows * w.cols).sum();
    let p = par::SendPtr::of(out);
    par::for_chunks(total, work, |range| {
        let mut base = 0;
        for ((w, at), &rb) in parts.iter().zip(&row_bytes) {
            let (lo, hi) = (range.start.max(base), range.end.min(base + w.rows));
            if lo < hi {
                // SAFETY: `at + w.rows` lies inside `out` (checked above).
                let o = unsafe { p.add(*at) };
                rows_of(
                    w.dt,
                    w.bytes,
                    rb,
                    x,
                    1,
                    w.cols,
                    lo - base..hi - base,
                    o,
                    w.rows,
                );
            }
            base += w.rows;
        }
    });
    true
}

/// The bytes of one row of `w` when [`qmatvec`] covers it for `n` rows of `x`.
fn fits(w: &Blocks, x: &QuantizedX, n: usize) -> Option<usize> {
    let bb = block_bytes(w.dt)?;
    let ok = n > 0
        && n <= MAX_ROWS
        && w.cols.is_multiple_of(32)
        && w.bytes.len() == w.rows * (w.cols / 32) * bb
        && x.q.len() >= n * w.cols;
    ok.then_some((w.cols / 32) * bb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::rand;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// Against the dense product on candle's own dequantization of the same blocks, within the
    /// rounding of x to 8 bits (at most half a step, d/2, per entry); and the SIMD path against
    /// the portable one.
    #[test]
    fn equals_the_dense_product_within_the_rounding_of_x() {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (rows, cols, n) in [(37, 64, 1), (8, 96, 3), (130, 576, 8)] {
                let w = rand(&[rows, cols], 1, 1.0);
                let q = QTensor::quantize(&w, dt).unwrap();
                let dense: Vec<f32> = q
                    .dequantize(&dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let x: Vec<f32> = rand(&[n, cols], 2, 1.0)
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xq = quantize_x(&x, n, cols);
                let bytes = q.data().unwrap();
                let blocks = Blocks {
                    dt,
                    bytes: &bytes,
                    rows,
                    cols,
                };
                // Written into a wider output (a slice of a larger matrix's columns).
                let stride = rows + 5;
                let mut out = vec![f32::NAN; n * stride];
                assert!(qmatvec(&blocks, &xq, n, &mut out, stride));
                let mut portable = vec![f32::NAN; n * stride];
                let row_bytes = bytes.len() / rows;
                rows_portable(
                    dt,
                    &bytes,
                    row_bytes,
                    &xq,
                    n,
                    cols,
                    0..rows,
                    par::SendPtr::of(&mut portable),
                    stride,
                );
                for j in 0..n {
                    for r in 0..rows {
                        let (wr, xr) = (
                            &dense[r * cols..(r + 1) * cols],
                            &x[j * cols..(j + 1) * cols],
                        );
                        let want: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let bound: f64 = (0..cols / 32)
                            .map(|k| {
                                let half_step = xq.d[j * cols / 32 + k] as f64 / 2.0;
                                wr[k * 32..k * 32 + 32]
                                    .iter()
                                    .map(|v| v.abs() as f64)
                                    .sum::<f64>()
                                    * half_step
                            })
                            .sum();
                        let got = out[j * stride + r] as f64;
                        assert!(
                            (got - want).abs() <= 1.01 * bound + 1e-4,
                            "{dt:?} {rows}x{cols} row {j},{r}: {got} vs {want} (bound {bound})"
                        );
                        let p = portable[j * stride + r] as f64;
                        assert!(
                            (got - p).abs() <= 1e-4 * (1.0 + p.abs()),
                            "{dt:?} simd {got} vs portable {p}"
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
        let x = quantize_x(&[0.0; 320], 10, 32);
        assert!(!qmatvec(&w(GgmlDType::Q4K, &[], 256), &x, 1, &mut out, 1));
        assert!(!qmatvec(&w(GgmlDType::Q8_0, &q8, 32), &x, 9, &mut out, 1));
        assert!(!qmatvec(&w(GgmlDType::Q8_0, &q8, 33), &x, 1, &mut out, 1));
    }

    /// Several matrices over one input in one dispatch equal each product on its own, in
    /// place in the shared output; a part that does not fit writes nothing.
    #[test]
    fn parts_equal_their_products_alone() {
        let mats: Vec<(GgmlDType, usize)> = vec![
            (GgmlDType::Q4_1, 70),
            (GgmlDType::Q8_0, 33),
            (GgmlDType::Q4_0, 5),
        ];
        let cols = 96;
        let qs: Vec<QTensor> = mats
            .iter()
            .enumerate()
            .map(|(i, (dt, rows))| {
                QTensor::quantize(&rand(&[*rows, cols], i as u64, 1.0), *dt).unwrap()
            })
            .collect();
        let data: Vec<_> = qs.iter().map(|q| q.data().unwrap()).collect();
        let blocks = |i: usize| Blocks {
            dt: mats[i].0,
            bytes: &data[i],
            rows: mats[i].1,
            cols,
        };
        let x: Vec<f32> = rand(&[1, cols], 9, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xq = quantize_x(&x, 1, cols);
        let (at, total) = ([0, 70, 103], 108);
        let parts: Vec<_> = (0..3).map(|i| (blocks(i), at[i])).collect();
        let mut out = vec![f32::NAN; total];
        assert!(qmatvec_parts(&parts, &xq, &mut out));
        for i in 0..3 {
            let mut alone = vec![0f32; mats[i].1];
            assert!(qmatvec(&blocks(i), &xq, 1, &mut alone, mats[i].1));
            assert_eq!(&out[at[i]..at[i] + mats[i].1], &alone[..], "part {i}");
        }
        let mut short = vec![f32::NAN; total - 1];
        assert!(!qmatvec_parts(&parts, &xq, &mut short));
        assert!(short.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn x_rounds_to_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.37).collect();
        let q = quantize_x(&x, 1, 64);
        for (k, (xs, qs)) in x.chunks(32).zip(q.q.chunks(32)).enumerate() {
            let d = q.d[k];
            for (a, &b) in xs.iter().zip(qs) {
                assert!((a - d * b as f32).abs() <= d / 2.0 + 1e-6);
            }
            let sum: i32 = qs.iter().map(|&v| v as i32).sum();
            assert!((q.s[k] - d * sum as f32).abs() < 1e-5);
        }
        // An all-zero block has scale 0, not NaN.
        let z = quantize_x(&[0.0; 32], 1, 32);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0.0));
    }
}
