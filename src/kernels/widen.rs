//! Half-precision weights widened to f32 for the f32 kernels, in parallel. On the CPU a bf16 or
//! f16 model keeps its frozen weights at half size and computes in f32 (see
//! [`crate::runtime::device::compute_dtype`]); each product widens one weight (or one
//! vocabulary slice) at a time. candle's own `to_dtype` does this on one thread, which cost
//! more than the product itself on small models.

use super::par::{for_chunks, SendPtr};
use candle_core::{DType, Device, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Elements each task of the pool widens.
const PART: usize = 1 << 16;

/// `t` as a fresh f32 tensor when it is a contiguous bf16 or f16 tensor on the CPU; `None`
/// otherwise (the caller converts with candle's op).
pub fn widen(t: &Tensor) -> Option<Result<Tensor>> {
    if !super::enabled() || !t.device().is_cpu() || !matches!(t.dtype(), DType::BF16 | DType::F16) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let mut out = vec![0f32; end - start];
    match t.dtype() {
        DType::BF16 => convert(&cpu.as_slice::<bf16>().ok()?[start..end], &mut out),
        _ => convert(&cpu.as_slice::<f16>().ok()?[start..end], &mut out),
    }
    drop(storage);
    Some(Tensor::from_vec(out, t.dims(), &Device::Cpu))
}

/// `t` in f32: as held when it is f32, widened by [`widen`] when it can, else by candle.
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    match widen(t) {
        Some(done) => done,
        None => t.to_dtype(DType::F32),
    }
}

fn convert<T>(src: &[T], out: &mut [f32])
where
    [T]: HalfFloatSliceExt,
    T: Sync,
{
    let n = src.len();
    let p = SendPtr::of(out);
    for_chunks(n.div_ceil(PART), n, |parts| {
        let (a, b) = (parts.start * PART, (parts.end * PART).min(n));
        // SAFETY: each range of parts writes its own disjoint range of `out`.
        let dst = unsafe { p.slice(a, b - a) };
        src[a..b].convert_to_f32_slice(dst);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_equals_candles_conversion() {
        // Several parts and a ragged last one; a view at an offset, and f16 as well.
        let x = crate::kernels::testing::rand(&[3, PART + 77], 5, 3.0);
        for dt in [DType::BF16, DType::F16] {
            let half = x.to_dtype(dt).unwrap();
            let want = half.to_dtype(DType::F32).unwrap();
            let got = widen(&half).unwrap().unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(crate::kernels::testing::max_rel_diff(&got, &want), 0.0);
            let row = half.narrow(0, 1, 2).unwrap();
            let got = widen(&row).unwrap().unwrap();
            let want = row.to_dtype(DType::F32).unwrap();
            assert_eq!(crate::kernels::testing::max_rel_diff(&got, &want), 0.0);
        }
        assert!(widen(&x).is_none(), "f32 is not widened");
        let strided = x.to_dtype(DType::BF16).unwrap().t().unwrap();
        assert!(
            widen(&strided).is_none(),
            "a transposed view is left to candle"
        );
    }
}
