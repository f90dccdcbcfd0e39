//! f32 GEMM on borrowed tensor data, split across the pool by the kernels themselves.
//!
//! The `gemm` crate's own threading scales badly on the step's shapes when the weight is the
//! transposed operand (`x Wᵀ`, every forward linear): measured on 2 cores, 88–150 GFLOP/s
//! against 180–200 for `dY W`. Giving each thread a contiguous block of output columns (a block
//! of weight rows) and running the GEMM single-threaded on it brings the forward up to the
//! backward's speed.

use super::par::{self, SendPtr};
use candle_core::{DType, Storage, Tensor};
use std::ops::Deref;

/// A contiguous f32 CPU tensor's data, borrowed for as long as the view lives.
pub struct View<'a> {
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    start: usize,
    end: usize,
}

impl View<'_> {
    pub fn of(t: &Tensor) -> Option<View<'_>> {
        if !super::enabled() || t.dtype() != DType::F32 || !t.device().is_cpu() {
            return None;
        }
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        let ok = matches!(&*guard, Storage::Cpu(c) if c.as_slice::<f32>().is_ok());
        ok.then(|| View {
            guard: Box::new(guard),
            start,
            end,
        })
    }

    pub fn slice(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(c) => c
                .as_slice::<f32>()
                .map_or(&[], |s| &s[self.start..self.end]),
            _ => &[],
        }
    }
}

/// A matrix operand: data with its row and column strides.
#[derive(Clone, Copy)]
pub struct Op<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Op<'a> {
    /// Row-major `[_, cols]`.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Op {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `[_, cols]` matrix.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Op {
            data,
            rs: 1,
            cs: cols,
        }
    }
    /// Whether every element of a `rows × cols` matrix lies inside the data.
    pub fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
    /// The operand starting at row `r`, column `c`.
    pub fn at(self, r: usize, c: usize) -> Op<'a> {
        let off = r * self.rs + c * self.cs;
        Op {
            data: &self.data[off.min(self.data.len())..],
            ..self
        }
    }
}

/// A row-major destination with row stride `rs` (columns contiguous).
#[derive(Clone, Copy)]
pub struct Dst {
    ptr: SendPtr,
    len: usize,
    pub rs: usize,
}

impl Dst {
    pub fn rows(data: &mut [f32], cols: usize) -> Self {
        Dst {
            ptr: SendPtr::of(data),
            len: data.len(),
            rs: cols,
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + cols <= self.len
    }
    /// A destination over the `len` elements at `ptr`, rows `rs` apart.
    ///
    /// # Safety
    /// `ptr` points to `len` elements of one buffer, and what is written through this and any
    /// other destination made from the same buffer does not overlap.
    pub unsafe fn from_raw(ptr: SendPtr, len: usize, rs: usize) -> Self {
        Dst { ptr, len, rs }
    }
    /// The block starting at row `r`, column `c`.
    pub fn at(self, r: usize, c: usize) -> Dst {
        let off = (r * self.rs + c).min(self.len);
        Dst {
            // SAFETY: `off` is clamped to the buffer's length.
            ptr: SendPtr(unsafe { self.ptr.0.add(off) }),
            len: self.len - off,
            rs: self.rs,
        }
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + beta · lhs[m×k] · rhs[k×n]`, `dst` row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Op,
    rhs: Op,
    beta: f32,
) {
    let dst = Dst::rows(dst, n);
    check(m, n, k, &dst, &lhs, &rhs);
    let threads = par::threads();
    if threads == 1 || m * n * k < PAR_MIN_FLOPS {
        return serial(m, n, k, dst, accumulate, lhs, rhs, beta);
    }
    // Columns (weight rows) in blocks of 16, the microkernel's width, when there are enough
    // of them; rows otherwise (the thin LoRA products).
    let col_block = (n.div_ceil(threads)).div_ceil(16) * 16;
    if n >= 32 * threads {
        par::on_each_thread(|t, _| {
            let c0 = t * col_block;
            if c0 < n {
                let cn = col_block.min(n - c0);
                serial(
                    m,
                    cn,
                    k,
                    dst.at(0, c0),
                    accumulate,
                    lhs,
                    rhs.at(0, c0),
                    beta,
                );
            }
        });
    } else {
        let row_block = m.div_ceil(threads);
        par::on_each_thread(|t, _| {
            let r0 = t * row_block;
            if r0 < m {
                let rn = row_block.min(m - r0);
                serial(
                    rn,
                    n,
                    k,
                    dst.at(r0, 0),
                    accumulate,
                    lhs.at(r0, 0),
                    rhs,
                    beta,
                );
            }
        });
    }
}

/// Panics unless every element the strides address lies inside its buffer (a bug in the
/// caller, never the user's input: the kernels check shapes before they get here).
fn check(m: usize, n: usize, k: usize, dst: &Dst, lhs: &Op, rhs: &Op) {
    assert!(
        dst.fits(m, n) && lhs.fits(m, k) && rhs.fits(k, n),
        "GEMM operands do not match {m}x{k}·{k}x{n}"
    );
}

/// [`gemm`] into a strided destination, on the calling thread only: for kernels that split
/// their work themselves and call this from inside the pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: Dst,
    accumulate: bool,
    lhs: Op,
    rhs: Op,
    beta: f32,
) {
    check(m, n, k, &dst, &lhs, &rhs);
    serial(m, n, k, dst, accumulate, lhs, rhs, beta)
}

/// Below this many multiply-adds a GEMM stays on the calling thread.
const PAR_MIN_FLOPS: usize = 1 << 17;

#[allow(clippy::too_many_arguments)]
fn serial(m: usize, n: usize, k: usize, dst: Dst, accumulate: bool, lhs: Op, rhs: Op, beta: f32) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: `fits` checked the destination's rows.
                unsafe { dst.ptr.slice(r * dst.rs, n) }.fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the callers checked (`fits`) that every element the strides address lies inside
    // its buffer; the destination is exclusively borrowed and each thread writes its own block.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr.0,
            1,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Op, b: Op) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    out[i * n + j] +=
                        a.data[i * a.rs + l * a.cs] as f64 * b.data[l * b.rs + j * b.cs] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn split_gemm_matches_a_plain_loop() {
        // Shapes on both sides of the threading threshold and of the column/row split.
        for (m, n, k) in [(3, 5, 7), (61, 8, 576), (240, 192, 576), (17, 1000, 33)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
                .collect();
            for (bt, rhs) in [(false, Op::rows(&b, n)), (true, Op::transposed(&b, k))] {
                let want = naive(m, n, k, Op::rows(&a, k), rhs);
                let mut out = vec![1f32; m * n];
                gemm(m, n, k, &mut out, true, Op::rows(&a, k), rhs, 0.5);
                for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                    let w = 1.0 + 0.5 * w;
                    assert!(
                        (o as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{m}x{n}x{k} bt={bt} [{i}]"
                    );
                }
            }
        }
    }
}
