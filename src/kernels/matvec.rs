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

/// A contiguous 2-D f32, bf16 or f16 tensor on the CPU, borrowed for the products.
pub struct Matrix<'a> {
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    start: usize,
    pub rows: usize,
    pub cols: usize,
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

/// `out[at + r] = Σ_c W[r, c]·x[c]` for every row `r` of each `(W, at)` of `parts`: several
/// products over the same input (q, k and v; gate and up) as one parallel dispatch over all
/// their rows. False (nothing written) when a part's width is not `x`'s or it does not fit in
/// `out`.
pub fn matvec_parts(parts: &[(Matrix, usize)], x: &[f32], out: &mut [f32]) -> bool {
    // (elements, first output, rows) of each part: the guards stay on this thread.
    let mut data = Vec::with_capacity(parts.len());
    for (w, at) in parts {
        match w.data() {
            Some(d) if w.cols == x.len() && at + w.rows <= out.len() => data.push((d, *at, w.rows)),
            _ => return false,
        }
    }
    let total: usize = data.iter().map(|(_, _, rows)| rows).sum();
    let p = par::SendPtr::of(out);
    par::for_chunks(total, total * x.len(), |range| {
        let mut base = 0;
        for &(d, at, rows) in &data {
            let (lo, hi) = (range.start.max(base), range.end.min(base + rows));
            if lo < hi {
                // SAFETY: rows `lo − base..hi − base` of this part are this chunk's alone, and
                // `at + rows` lies inside `out` (checked above).
                let o = unsafe { p.slice(at + lo - base, hi - lo) };
                rows_of(d, x, lo - base..hi - base, o);
            }
            base += rows;
        }
    });
    true
}

/// Rows `rows` of `W·x` into `out` (one value per row).
fn rows_of(w: Rows, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU was just checked for the features `avx2::rows_of` is compiled with.
        return unsafe { avx2::rows_of(w, x, rows, out) };
    }
    rows_portable(w, x, rows, out)
}

/// [`rows_of`] without SIMD (and the oracle the SIMD version is tested against).
fn rows_portable(w: Rows, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
    let cols = x.len();
    for (o, r) in out.iter_mut().zip(rows) {
        let span = r * cols..(r + 1) * cols;
        *o = match w {
            Rows::F32(d) => super::dot(&d[span], x),
            Rows::Bf16(d) => d[span].iter().zip(x).map(|(w, x)| w.to_f32() * x).sum(),
            Rows::F16(d) => d[span].iter().zip(x).map(|(w, x)| w.to_f32() * x).sum(),
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Rows;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Eight weights at `p` widened to f32.
    trait Widen {
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
    pub unsafe fn rows_of(w: Rows, x: &[f32], rows: Range<usize>, out: &mut [f32]) {
        match w {
            Rows::F32(d) => rows_t(d, x, rows, out),
            Rows::Bf16(d) => rows_t(d, x, rows, out),
            Rows::F16(d) => rows_t(d, x, rows, out),
        }
    }

    /// Four independent chains of FMAs a row (32 weights an iteration), summed at its end.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_t<T: Widen + Copy>(w: &[T], x: &[f32], rows: Range<usize>, out: &mut [f32]) {
        let cols = x.len();
        let full = cols / 32 * 32;
        let eights = cols / 8 * 8;
        let xp = x.as_ptr();
        for (o, r) in out.iter_mut().zip(rows) {
            let row = &w[r * cols..(r + 1) * cols];
            let wp = row.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < full {
                for (k, a) in acc.iter_mut().enumerate() {
                    let at = c + 8 * k;
                    *a = _mm256_fmadd_ps(T::load8(wp.add(at)), _mm256_loadu_ps(xp.add(at)), *a);
                }
                c += 32;
            }
            while c < eights {
                acc[0] = _mm256_fmadd_ps(T::load8(wp.add(c)), _mm256_loadu_ps(xp.add(c)), acc[0]);
                c += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            let tail: f32 = row[eights..]
                .iter()
                .zip(&x[eights..])
                .map(|(w, x)| w.to_f32() * x)
                .sum();
            *o = _mm_cvtss_f32(s) + tail;
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
                    rows_portable(w.data().unwrap(), &x, 0..rows, &mut portable);
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
