//! `W·x` for decoding's one new token against dense weights held in f32, bf16 or f16: each
//! weight is read once at its stored size and widened in registers, the arithmetic in f32 on
//! the exact input. Decoding is bound by reading the weights, so a bf16 or f16 matrix runs in
//! about half the time of an f32 one, and needs no f32 copy at all (candle's product would
//! widen the whole matrix first, or compute in bf16). The result is the f32 product on the
//! widened weights to float rounding.

use super::par;
use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::{bf16, f16};
use std::ops::{Deref, Range};

/// A row-major matrix's elements as stored.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(d) => d.len(),
            Rows::Bf16(d) => d.len(),
            Rows::F16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements `r`.
    pub fn range(self, r: Range<usize>) -> Rows<'a> {
        match self {
            Rows::F32(d) => Rows::F32(&d[r]),
            Rows::Bf16(d) => Rows::Bf16(&d[r]),
            Rows::F16(d) => Rows::F16(&d[r]),
        }
    }
}

/// A contiguous 2-D f32, bf16 or f16 tensor on the CPU, borrowed for the products.
pub struct Matrix<'a> {
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    start: usize,
    rows: usize,
    cols: usize,
}

impl Matrix<'_> {
    /// `t` when it is a contiguous 2-D f32, bf16 or f16 tensor on the CPU (and the kernels are
    /// on); `None` otherwise.
    pub fn of(t: &Tensor) -> Option<Matrix<'_>> {
        let covered = matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16);
        if !super::enabled() || !covered || !t.device().is_cpu() {
            return None;
        }
        let (rows, cols) = t.dims2().ok()?;
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        let m = Matrix {
            guard: Box::new(guard),
            start,
            rows,
            cols,
        };
        (end - start == rows * cols && m.data().is_some()).then_some(m)
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The elements, row after row.
    pub fn data(&self) -> Option<Rows<'_>> {
        let Storage::Cpu(cpu) = &**self.guard else {
            return None;
        };
        let span = self.start..self.start + self.rows * self.cols;
        // By variant: a failed `as_slice` builds an error, with a backtrace when
        // RUST_BACKTRACE is set, and this runs for every product of every token.
        match cpu {
            CpuStorage::F32(s) => s.get(span).map(Rows::F32),
            CpuStorage::BF16(s) => s.get(span).map(Rows::Bf16),
            CpuStorage::F16(s) => s.get(span).map(Rows::F16),
            _ => None,
        }
    }
}

/// Rows of `x` one pass over the weights serves (a prompt's tokens share the pass).
pub const MAX_ROWS: usize = 8;

/// `out[at + r] = Σ_c W[r, c]·x[c]` for every row `r` of each `(W, at)` of `parts`: several
/// products over the same input (q, k and v; gate and up) as one parallel dispatch over all
/// their rows. False (nothing written) when a part's width is not `x`'s, it does not fit in
/// `out`, or two parts' outputs overlap.
pub fn matvec_parts(parts: &[(Matrix, usize)], x: &[f32], out: &mut [f32]) -> bool {
    // (elements, first output, rows) of each part: the guards stay on this thread.
    let mut data = Vec::with_capacity(parts.len());
    for (w, at) in parts {
        match w.data() {
            Some(d) if w.cols == x.len() && w.cols > 0 && at + w.rows <= out.len() => {
                data.push((d, *at, w.rows))
            }
            _ => return false,
        }
    }
    if !par::disjoint(data.iter().map(|&(_, at, rows)| at..at + rows)) {
        return false;
    }
    let total: usize = data.iter().map(|(_, _, rows)| rows).sum();
    let p = par::SendPtr::of(out);
    par::for_chunks(total, total * x.len(), |range| {
        let mut base = 0;
        for &(d, at, rows) in &data {
            let (lo, hi) = (range.start.max(base), range.end.min(base + rows));
            if lo < hi {
                // SAFETY: `at + rows` lies inside `out` (checked above); rows `lo − base..hi −
                // base` of this part are this chunk's alone.
                let o = unsafe { p.add(at) };
                rows_of(d, x, 1, lo - base..hi - base, o, rows);
            }
            base += rows;
        }
    });
    true
}

/// `out = x·Wᵀ` for the `n` rows of `x` (`[n, cols]`) into `out` (`[n, rows]`): a prompt's
/// few tokens, [`MAX_ROWS`] of them to each pass over the weights, which are read as stored.
/// False (nothing written) when the shapes do not agree.
pub fn matmul_rows(w: &Matrix, x: &[f32], n: usize, out: &mut [f32]) -> bool {
    let Some(d) = w.data() else {
        return false;
    };
    if n == 0 || w.cols == 0 || x.len() != n * w.cols || out.len() != n * w.rows {
        return false;
    }
    let (rows, cols) = (w.rows, w.cols);
    let p = par::SendPtr::of(out);
    for first in (0..n).step_by(MAX_ROWS) {
        let m = MAX_ROWS.min(n - first);
        let xs = &x[first * cols..(first + m) * cols];
        // SAFETY: row `first` of the output starts inside `out`.
        let o = unsafe { p.add(first * rows) };
        par::for_chunks(rows, rows * cols * m, |range| {
            rows_of(d, xs, m, range, o, rows)
        });
    }
    true
}

/// `out[j·stride + r] = Σ_c W[r, c]·x[j, c]` for the rows `rows` of `W` and the `n ≤
/// MAX_ROWS` rows of `x`.
pub(super) fn rows_of(
    w: Rows,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    out: par::SendPtr,
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU was just checked for the features `avx2::rows_of` is compiled with.
        return unsafe { avx2::rows_of(w, x, n, rows, out, stride) };
    }
    rows_portable(w, x, n, rows, out, stride)
}

/// `out[i·d + c] += Σ_j p[i·len + j]·V[j, c]` for the `n ≤ MAX_ROWS` weightings `p`
/// (`[n, len]`) of the `len` rows of `v` (`[len, d]`, with `d = out.len() / n`): attention's
/// probabilities applied to a cache's values, each row of `v` read once for all `n` and
/// widened in registers.
pub(super) fn add_weighted_rows(out: &mut [f32], p: &[f32], v: Rows, n: usize) {
    let d = out.len() / n.max(1);
    let len = p.len() / n.max(1);
    if n == 0 || n > MAX_ROWS || d == 0 || v.len() < len * d {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU was just checked for the features `avx2` is compiled with; the
        // lengths were checked above.
        return unsafe {
            match v {
                Rows::F32(v) => avx2::weighted::<f32>(out, p, v, n, d, len),
                Rows::Bf16(v) => avx2::weighted::<half::bf16>(out, p, v, n, d, len),
                Rows::F16(v) => avx2::weighted::<half::f16>(out, p, v, n, d, len),
            }
        };
    }
    weighted_portable(out, p, v, n, d, len)
}

/// [`add_weighted_rows`] without SIMD.
fn weighted_portable(out: &mut [f32], p: &[f32], v: Rows, n: usize, d: usize, len: usize) {
    for j in 0..len {
        for c in 0..d {
            let x = match v {
                Rows::F32(v) => v[j * d + c],
                Rows::Bf16(v) => v[j * d + c].to_f32(),
                Rows::F16(v) => v[j * d + c].to_f32(),
            };
            for i in 0..n {
                out[i * d + c] += p[i * len + j] * x;
            }
        }
    }
}

/// [`rows_of`] without SIMD (and the oracle the SIMD version is tested against).
fn rows_portable(
    w: Rows,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    out: par::SendPtr,
    stride: usize,
) {
    let cols = x.len() / n;
    for r in rows {
        let span = r * cols..(r + 1) * cols;
        for (j, xj) in x.chunks_exact(cols).enumerate() {
            let v = match w {
                Rows::F32(d) => super::dot(&d[span.clone()], xj),
                Rows::Bf16(d) => d[span.clone()]
                    .iter()
                    .zip(xj)
                    .map(|(w, x)| w.to_f32() * x)
                    .sum(),
                Rows::F16(d) => d[span.clone()]
                    .iter()
                    .zip(xj)
                    .map(|(w, x)| w.to_f32() * x)
                    .sum(),
            };
            // SAFETY: the caller's output holds row j at `j·stride`, and row r is its alone.
            unsafe { *out.0.add(j * stride + r) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{par, Rows};
    use crate::kernels::hsum;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Eight weights at `p` widened to f32.
    pub(super) trait Widen {
        unsafe fn load8(p: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }

    impl Widen for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl Widen for half::bf16 {
        /// bf16 is the top half of an f32: zero-extend and shift.
        #[inline(always)]
        unsafe fn load8(p: *const half::bf16) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
        fn to_f32(self) -> f32 {
            half::bf16::to_f32(self)
        }
    }

    impl Widen for half::f16 {
        #[inline(always)]
        unsafe fn load8(p: *const half::f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        fn to_f32(self) -> f32 {
            half::f16::to_f32(self)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_of(
        w: Rows,
        x: &[f32],
        n: usize,
        rows: Range<usize>,
        out: par::SendPtr,
        stride: usize,
    ) {
        macro_rules! by_n {
            ($($n:literal)*) => {
                match (n, w) {
                    $(($n, Rows::F32(d)) => rows_n::<$n, f32>(d, x, rows, out, stride),
                      ($n, Rows::Bf16(d)) => rows_n::<$n, half::bf16>(d, x, rows, out, stride),
                      ($n, Rows::F16(d)) => rows_n::<$n, half::f16>(d, x, rows, out, stride),)*
                    _ => unreachable!("at most MAX_ROWS rows"),
                }
            };
        }
        by_n!(1 2 3 4 5 6 7 8)
    }

    /// `N` rows of x against the rows `rows` of W: each 8 weights widened once for all N.
    /// Independent chains of FMAs per row of x (4 for one row, 2 up to four rows, else one:
    /// the sums must stay in the 16 registers), summed at the row's end.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_n<const N: usize, T: Widen + Copy>(
        w: &[T],
        x: &[f32],
        rows: Range<usize>,
        out: par::SendPtr,
        stride: usize,
    ) {
        let cols = x.len() / N;
        let chains = if N == 1 {
            4
        } else if N <= 4 {
            2
        } else {
            1
        };
        let step = 8 * chains;
        let full = cols / step * step;
        let eights = cols / 8 * 8;
        let xp = x.as_ptr();
        for r in rows {
            let row = &w[r * cols..(r + 1) * cols];
            let wp = row.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); N]; 4];
            let mut c = 0;
            while c < full {
                for (k, a) in acc.iter_mut().enumerate().take(chains) {
                    let at = c + 8 * k;
                    let wv = T::load8(wp.add(at));
                    for (j, aj) in a.iter_mut().enumerate() {
                        *aj = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(j * cols + at)), *aj);
                    }
                }
                c += step;
            }
            while c < eights {
                let wv = T::load8(wp.add(c));
                for (j, aj) in acc[0].iter_mut().enumerate() {
                    *aj = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(j * cols + c)), *aj);
                }
                c += 8;
            }
            for j in 0..N {
                let v = _mm256_add_ps(
                    _mm256_add_ps(acc[0][j], acc[1][j]),
                    _mm256_add_ps(acc[2][j], acc[3][j]),
                );
                let xj = &x[j * cols..(j + 1) * cols];
                let tail: f32 = row[eights..]
                    .iter()
                    .zip(&xj[eights..])
                    .map(|(w, x)| w.to_f32() * x)
                    .sum();
                *out.0.add(j * stride + r) = hsum(v) + tail;
            }
        }
    }

    /// [`super::add_weighted_rows`] on `[len, d]` rows of `T`: each 8 values widened once
    /// for all `n` weightings.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted<T: Widen + Copy>(
        out: &mut [f32],
        p: &[f32],
        v: &[T],
        n: usize,
        d: usize,
        len: usize,
    ) {
        let eights = d / 8 * 8;
        let op = out.as_mut_ptr();
        for j in 0..len {
            let row = v.as_ptr().add(j * d);
            let mut c = 0;
            while c < eights {
                let x = T::load8(row.add(c));
                for i in 0..n {
                    let o = op.add(i * d + c);
                    let w = _mm256_set1_ps(p[i * len + j]);
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(w, x, _mm256_loadu_ps(o)));
                }
                c += 8;
            }
            for c in eights..d {
                let x = (*row.add(c)).to_f32();
                for i in 0..n {
                    out[i * d + c] += p[i * len + j] * x;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::rand;
    use candle_core::Device;

    /// Each dtype against the f64 product on the widened weights, the SIMD path against the
    /// portable one, ragged widths included; several parts in place in one output.
    #[test]
    fn equals_the_product_on_the_widened_weights() {
        for cols in [576, 77, 8, 40] {
            let x = rand(&[cols], 3, 1.0).to_vec1::<f32>().unwrap();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let shapes = [(37, 0), (5, 40), (64, 45)];
                let mats: Vec<Tensor> = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, (rows, _))| rand(&[*rows, cols], i as u64, 2.0).to_dtype(dt).unwrap())
                    .collect();
                let parts: Vec<_> = mats
                    .iter()
                    .zip(shapes)
                    .map(|(m, (_, at))| (Matrix::of(m).unwrap(), at))
                    .collect();
                let mut out = vec![f32::NAN; 109 + 3];
                assert!(matvec_parts(&parts, &x, &mut out));
                for ((m, (w, at)), (rows, _)) in mats.iter().zip(&parts).zip(shapes) {
                    let wide: Vec<f32> = m
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let mut portable = vec![0f32; rows];
                    let o = par::SendPtr::of(&mut portable);
                    rows_portable(w.data().unwrap(), &x, 1, 0..rows, o, rows);
                    for r in 0..rows {
                        let want: f64 = wide[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let got = out[at + r] as f64;
                        let tol = 1e-5 * (1.0 + want.abs()) * (cols as f64).sqrt();
                        assert!(
                            (got - want).abs() < tol,
                            "{dt:?} {cols} row {r}: {got} vs {want}"
                        );
                        let p = portable[r] as f64;
                        assert!((got - p).abs() < tol, "{dt:?} simd {got} vs portable {p}");
                    }
                }
                assert!(
                    out[109..].iter().all(|v| v.is_nan()),
                    "wrote past the parts"
                );
            }
        }
    }

    /// Several rows of x, in one pass and in several ([`MAX_ROWS`] a pass), against the f64
    /// product, in every dtype; the SIMD path against the portable one.
    #[test]
    fn rows_of_x_equal_the_product_on_the_widened_weights() {
        for (rows, cols) in [(29, 72), (13, 77)] {
            for n in [1, 2, 3, 5, 8, 11, 17] {
                let x = rand(&[n, cols], n as u64, 1.0).flatten_all().unwrap();
                let x = x.to_vec1::<f32>().unwrap();
                for dt in [DType::F32, DType::BF16, DType::F16] {
                    let m = rand(&[rows, cols], 9, 2.0).to_dtype(dt).unwrap();
                    let wide: Vec<f32> = m
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let w = Matrix::of(&m).unwrap();
                    let mut out = vec![f32::NAN; n * rows];
                    assert!(matmul_rows(&w, &x, n, &mut out));
                    let mut portable = vec![f32::NAN; n * rows];
                    for first in (0..n).step_by(MAX_ROWS) {
                        let k = MAX_ROWS.min(n - first);
                        let o = par::SendPtr::of(&mut portable[first * rows..]);
                        let xs = &x[first * cols..(first + k) * cols];
                        rows_portable(w.data().unwrap(), xs, k, 0..rows, o, rows);
                    }
                    for j in 0..n {
                        for r in 0..rows {
                            let want: f64 = (0..cols)
                                .map(|c| wide[r * cols + c] as f64 * x[j * cols + c] as f64)
                                .sum();
                            let (got, p) =
                                (out[j * rows + r] as f64, portable[j * rows + r] as f64);
                            let tol = 1e-5 * (1.0 + want.abs()) * (cols as f64).sqrt();
                            assert!(
                                (got - want).abs() < tol,
                                "{dt:?} n {n} ({j}, {r}): {got} vs {want}"
                            );
                            assert!(
                                (got - p).abs() < tol,
                                "{dt:?} n {n} simd {got} vs portable {p}"
                            );
                        }
                    }
                }
            }
        }
        let m = rand(&[4, 16], 1, 1.0);
        let w = Matrix::of(&m).unwrap();
        let mut out = vec![0f32; 8];
        assert!(!matmul_rows(&w, &[0.0; 31], 2, &mut out), "x is not n rows");
        assert!(
            !matmul_rows(&w, &[0.0; 32], 2, &mut out[..7]),
            "out too short"
        );
        assert!(!matmul_rows(&w, &[], 0, &mut []), "no rows");
    }

    #[test]
    fn refuses_what_it_does_not_cover() {
        let m = rand(&[4, 16], 1, 1.0);
        let x = [0f32; 16];
        let parts = [(Matrix::of(&m).unwrap(), 0)];
        let mut short = vec![f32::NAN; 3];
        assert!(!matvec_parts(&parts, &x, &mut short), "output too short");
        assert!(short.iter().all(|v| v.is_nan()));
        let mut out = vec![0f32; 4];
        assert!(!matvec_parts(&parts, &x[..15], &mut out), "width mismatch");
        let twice = [(Matrix::of(&m).unwrap(), 0), (Matrix::of(&m).unwrap(), 3)];
        let mut wide = vec![f32::NAN; 8];
        assert!(!matvec_parts(&twice, &x, &mut wide), "overlapping outputs");
        assert!(wide.iter().all(|v| v.is_nan()));
        assert!(Matrix::of(&m.t().unwrap()).is_none(), "a transposed view");
        assert!(
            Matrix::of(&m.to_dtype(DType::F64).unwrap()).is_none(),
            "f64"
        );
        let v = Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap();
        assert!(Matrix::of(&v).is_none(), "1-D");
        let rows = m.narrow(0, 1, 2).unwrap();
        let narrowed = Matrix::of(&rows).unwrap();
        let mut two = [0f32; 2];
        assert!(matvec_parts(&[(narrowed, 0)], &[1.0; 16], &mut two));
        let want: Vec<f32> = rows.sum(1).unwrap().to_vec1().unwrap();
        assert!((two[0] - want[0]).abs() < 1e-5 && (two[1] - want[1]).abs() < 1e-5);
    }
}
