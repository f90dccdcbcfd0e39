//! Work splitting for the kernels, on candle's own CPU thread pool.
//!
//! candle runs its elementwise ops on a pool of spinning workers (the calling thread takes
//! part), while the `gemm` crate's own parallelism goes through rayon: two pools on the same
//! cores, each spinning or sleeping while the other works (measured on 2 cores: ~10% of a
//! SmolLM2 step lost to it). The kernels put all their parallel work, GEMMs included, on
//! candle's pool and call the GEMM single-threaded on each thread's share.
//!
//! The closures given here must not call candle tensor ops: the pool is not re-entrant from the
//! calling thread.

use std::ops::Range;

/// Threads a parallel kernel runs on (candle's workers and the calling thread).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f(range)` over `0..n` in chunks, on every thread of the pool, or inline when `work`
/// (a rough count of elementary operations) is too small to be worth a fork.
pub fn for_chunks(n: usize, work: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || work < PAR_MIN_WORK || threads() == 1 {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f);
}

/// Runs `f(t, threads)` once on each thread `t` of the pool: static shares, for work whose
/// cost is known (GEMM blocks).
pub fn on_each_thread(f: impl Fn(usize, usize) + Sync) {
    let n = threads();
    if n == 1 {
        f(0, 1);
        return;
    }
    candle_core::utils::barrier_pool().execute(|t| f(t, n));
}

/// Below this many elementary operations a kernel stays on the calling thread: waking the pool
/// costs a few microseconds.
pub const PAR_MIN_WORK: usize = 1 << 15;

/// Whether no two of `ranges` overlap: products over several parts write their outputs from
/// several threads, unsynchronised.
pub fn disjoint(ranges: impl Iterator<Item = Range<usize>>) -> bool {
    let mut v: Vec<Range<usize>> = ranges.collect();
    v.sort_by_key(|r| r.start);
    v.windows(2).all(|w| w[0].end <= w[1].start)
}

/// A raw pointer that may cross threads: each thread writes only its own disjoint part.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: used only to hand disjoint parts of one exclusively borrowed buffer to the pool.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub fn of(s: &mut [f32]) -> Self {
        SendPtr(s.as_mut_ptr())
    }

    /// The pointer `n` elements on.
    ///
    /// # Safety
    /// The result lies inside (or one past) the buffer this was made from.
    pub unsafe fn add(self, n: usize) -> Self {
        SendPtr(self.0.add(n))
    }

    /// The `len` elements at `start`.
    ///
    /// # Safety
    /// `start..start + len` lies inside the buffer this was made from, and no other live
    /// slice overlaps it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Runs `f(row, out_row)` over the `cols`-wide rows of `out`, in parallel when worth it.
pub fn for_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if cols == 0 {
        return;
    }
    let rows = out.len() / cols;
    let p = SendPtr::of(out);
    for_chunks(rows, out.len(), |range| {
        for i in range {
            // SAFETY: row i is inside `out` and each row is handed out once.
            f(i, unsafe { p.slice(i * cols, cols) });
        }
    });
}

/// As [`for_rows`] over two outputs with as many rows, `a_cols` and `b_cols` wide.
pub fn for_rows2(
    a: &mut [f32],
    a_cols: usize,
    b: &mut [f32],
    b_cols: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    if a_cols == 0 || b_cols == 0 {
        return;
    }
    let rows = a.len() / a_cols;
    assert_eq!(rows, b.len() / b_cols, "row outputs of different heights");
    let (pa, pb) = (SendPtr::of(a), SendPtr::of(b));
    for_chunks(rows, a.len() + b.len(), |range| {
        for i in range {
            // SAFETY: row i is inside both buffers and each row is handed out once.
            unsafe {
                f(
                    i,
                    pa.slice(i * a_cols, a_cols),
                    pb.slice(i * b_cols, b_cols),
                )
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_visited_once() {
        for (rows, cols) in [(1, 1), (7, 3), (1000, 64)] {
            let mut out = vec![0f32; rows * cols];
            for_rows(&mut out, cols, |i, r| {
                for v in r.iter_mut() {
                    *v += i as f32 + 1.0;
                }
            });
            for (i, r) in out.chunks(cols).enumerate() {
                assert!(r.iter().all(|&v| v == i as f32 + 1.0), "row {i}");
            }
        }
    }

    #[test]
    fn each_thread_runs_once() {
        let seen = std::sync::Mutex::new(vec![]);
        on_each_thread(|t, n| seen.lock().unwrap().push((t, n)));
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        let n = threads();
        assert_eq!(seen, (0..n).map(|t| (t, n)).collect::<Vec<_>>());
    }
}
