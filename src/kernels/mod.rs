//! Fused CPU kernels for the training step (f32, contiguous tensors on the CPU).
//!
//! candle's composite ops run one pass over memory (and one allocation) per op; the step's
//! elementwise work (SwiGLU, the RMSNorm and softmax backwards) and the LoRA terms of every
//! linear cost more in those passes than in arithmetic. Each kernel here does its work in one
//! pass, parallel over rows, and the linears call the GEMM directly so that the LoRA term is
//! accumulated into the frozen weight's product instead of being added afterwards.
//!
//! Every kernel returns `None` for inputs it does not cover (another device or dtype, a
//! non-contiguous layout); the callers then use the composite ops, which are the oracle the
//! tests compare against.

/// Defines each function twice, the second compiled for AVX2 and FMA, and calls that one when
/// the CPU has them (the default x86-64 target only assumes SSE2).
macro_rules! multiversion {
    ($($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block)*) => {$(
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU was just checked for the features `avx2` is compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    )*};
}
mod attention;
mod elementwise;
mod exp;
mod gemm;
mod head;
mod linear;
pub mod matvec;
pub mod one_token;
pub mod par;
pub mod qmatvec;
pub mod qrows;
mod rope;
mod widen;

pub use attention::{attend_cached, attention, attention_backward, Heads};
pub use elementwise::{rms_norm_backward, swiglu, swiglu_backward};
pub use exp::exp;
pub use gemm::View;
pub use head::{cross_entropy_head, cross_entropy_head_sliced};
pub use linear::{linear_backward, linear_forward, LinearGrads, LowRank};
pub use rope::rope;
pub use widen::{to_f32, widen};

use candle_core::{DType, Device, Result, Storage, Tensor};

/// `Σ a·b` in eight independent lanes, so the loop vectorizes (a single running sum cannot be
/// reordered by the compiler).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The sum of an AVX register's eight lanes (inlined into the AVX2 kernels).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Whether the kernels run at all: `YOUR_AI_NO_KERNELS=1` sends every op down candle's composite
/// path (the code before these kernels), to compare the two on a real run.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("YOUR_AI_NO_KERNELS").is_none_or(|v| v.is_empty() || v == "0")
    })
}

/// Runs `f` on `t`'s data when it is a contiguous f32 tensor on the CPU.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !enabled() || t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok().map(|s| f(&s[start..end])),
        _ => None,
    }
}

/// Whether the fused kernels cover `t` (f32, CPU, contiguous).
pub fn covers(t: &Tensor) -> bool {
    with_f32(t, |_| ()).is_some()
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-random tensor with entries in `[-scale, scale)`.
    pub fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data")
    }

    /// Largest `|a − b| / (1 + |b|)` over all entries.
    pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32");
        let b = b
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32");
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }
}
