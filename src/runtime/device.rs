//! Device and compute-dtype choice, in one place so that a new backend touches only this file.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// `--device`: where tensors live.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The GPU where this build has one (MLX's, or candle's Metal), else the CPU.
    Auto,
    Cpu,
    Cuda,
    Metal,
}

/// `--dtype`: the compute dtype of the frozen weights and activations.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// f32 on CPU, bf16 on GPUs.
    Auto,
    F32,
    F16,
    Bf16,
}

/// The device candle computes on. NVIDIA GPUs are the MLX engine's (its CUDA build): candle's
/// own CUDA path was removed once MLX's had measured 2.4-6× faster at 8B on an H200 and kept the
/// memory contract there (docs/gpu.md).
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => Err(Error::Usage(
            "--device cuda: NVIDIA GPUs train on the MLX engine: `train --engine mlx --device \
             cuda` in a binary built by `scripts/build_mlx.sh --cuda`. The candle engine (and \
             this command with it) computes on the CPU: leave --device out"
                .into(),
        )),
        DeviceChoice::Metal => metal(true),
        DeviceChoice::Auto => Ok(metal(false).unwrap_or(Device::Cpu)),
    }
}

#[cfg(feature = "metal")]
fn metal(_explicit: bool) -> Result<Device> {
    Device::new_metal(0)
        .map_err(|e| Error::Usage(format!("--device metal: no usable Metal device: {e}")))
}

#[cfg(not(feature = "metal"))]
fn metal(_explicit: bool) -> Result<Device> {
    Err(Error::Usage(
        "--device metal: this build has no Metal support; rebuild with `cargo build --release --features metal`".into(),
    ))
}

pub fn select_dtype(choice: DTypeChoice, device: &Device) -> DType {
    match choice {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Bf16 => DType::BF16,
        DTypeChoice::Auto if device.is_cpu() => DType::F32,
        DTypeChoice::Auto => DType::BF16,
    }
}

/// The dtype the candle engine trains and scores in, its frozen weights held in `weights` on
/// `device`: on the CPU, f32 for bf16/f16 weights too. The fused kernels compute in f32 and
/// widen each half-precision weight as a product needs it, while candle's half-precision CPU
/// matmul is several times slower (SmolLM2, 4×256: 151 against 542 tokens/s); the weights
/// keep their half size. Elsewhere (GPUs, or with the kernels off) the weights' dtype.
pub fn compute_dtype(weights: DType, device: &Device) -> DType {
    let half = matches!(weights, DType::BF16 | DType::F16);
    if half && device.is_cpu() && crate::kernels::enabled() {
        DType::F32
    } else {
        weights
    }
}

/// The dtype `--dtype auto` holds the weights in for the candle engine on the CPU: the dtype
/// the checkpoint's block linears are stored in (`stored`) when it is bf16/f16, they are not
/// quantized at load, and the step computes them in f32 (f32 would double them without
/// changing a value); else f32.
pub fn cpu_auto_weights(stored: Option<DType>, quantized: bool) -> DType {
    match stored {
        Some(d @ (DType::BF16 | DType::F16))
            if !quantized && compute_dtype(d, &Device::Cpu) == DType::F32 =>
        {
            d
        }
        _ => DType::F32,
    }
}

/// Sets the compute thread count (candle and its matrix multiplies read RAYON_NUM_THREADS) before
/// any thread pool starts: `--threads`, else RAYON_NUM_THREADS if set, else the physical cores.
pub fn set_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => {
            return Err(Error::Usage(
                "--threads 0: give at least 1 (or leave it out for one per physical core)".into(),
            ))
        }
        Some(n) => {
            let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
            // Past the cores each thread waits on the others: 16 on 2 cores decoded 60 times
            // slower, and 1000 never finished.
            if n > 4 * logical {
                return Err(Error::Usage(format!(
                    "--threads {n}: this machine runs {logical} threads at once; give at most \
                     {} (or leave it out for one per physical core)",
                    4 * logical
                )));
            }
            if n > logical {
                eprintln!(
                    "note: --threads {n} is more than the {logical} this machine runs at once; \
                     the extra threads only wait on the others"
                );
            }
            n
        }
        None => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) if n > 0 => n,
            _ => crate::runtime::hardware::physical_cores_here(),
        },
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(n)
}
