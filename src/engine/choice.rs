//! `train --engine`: which engine does the arithmetic, and the default for a device.

use crate::error::{Error, Result};
use crate::model::args::ModelArgs;
use crate::model::quantized::QuantBits;
use crate::model::LoadOptions;
use crate::runtime::device::{DTypeChoice, DeviceChoice};
use candle_core::{DType, Device};

/// `--engine`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// candle tensors and the fused CPU kernels (the CPU engine; Metal through candle's own
    /// kernels).
    Candle,
    /// MLX (the `mlx` feature): Metal on Apple silicon, NVIDIA GPUs with MLX's CUDA build, MLX's
    /// CPU backend elsewhere.
    Mlx,
}

/// Whether this binary has the MLX engine.
pub const HAS_MLX: bool = cfg!(feature = "mlx");

/// The engine a run uses: `given`, else MLX for `--device metal|cuda` (and for `--device auto`
/// where MLX has a GPU: on macOS, or an NVIDIA GPU with MLX's CUDA build) where this binary has
/// it, else candle.
pub fn resolve(given: Option<EngineChoice>, device: DeviceChoice) -> Result<EngineChoice> {
    resolve_for(
        given,
        device,
        HAS_MLX,
        cfg!(target_os = "macos") || mlx_gpu_here(),
    )
}

/// Whether this binary's MLX has a GPU here.
fn mlx_gpu_here() -> bool {
    #[cfg(feature = "mlx")]
    {
        crate::engine::mlx::device::gpu_backend().is_some()
    }
    #[cfg(not(feature = "mlx"))]
    false
}

/// Whether this binary can train on a GPU: candle's Metal, or an MLX with a GPU backend
/// (Metal on macOS, or MLX's CUDA build).
pub fn gpu_build() -> bool {
    #[cfg(feature = "mlx")]
    let mlx = cfg!(target_os = "macos") || crate::engine::mlx::device::CUDA_BUILD;
    #[cfg(not(feature = "mlx"))]
    let mlx = false;
    cfg!(feature = "metal") || mlx
}

fn no_mlx() -> Error {
    Error::Usage(
        "--engine mlx: this binary was built without the MLX engine; build it with \
         scripts/build_mlx.sh (which installs what it needs), or \
         `cargo build --release --features mlx`"
            .into(),
    )
}

fn resolve_for(
    given: Option<EngineChoice>,
    device: DeviceChoice,
    has_mlx: bool,
    mlx_gpu: bool,
) -> Result<EngineChoice> {
    let gpu = match device {
        DeviceChoice::Metal | DeviceChoice::Cuda => true,
        DeviceChoice::Auto => mlx_gpu,
        DeviceChoice::Cpu => false,
    };
    match given {
        Some(EngineChoice::Mlx) if !has_mlx => Err(no_mlx()),
        Some(e) => Ok(e),
        None if has_mlx && gpu => Ok(EngineChoice::Mlx),
        None => Ok(EngineChoice::Candle),
    }
}

/// Puts MLX on the device `--device` names ([`crate::engine::mlx::device`]) and says how the
/// MLX engine has the model loaded: on the host (the engine converts it to MLX arrays on that
/// device), in the dtype it computes in: f32 on the CPU, bf16 on a GPU, or as `--dtype` says.
pub fn mlx_load_options(m: &ModelArgs, quantize: Option<QuantBits>) -> Result<LoadOptions> {
    let gpu = mlx_device(m.device)?;
    let dtype = match m.dtype {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Bf16 => DType::BF16,
        DTypeChoice::Auto if gpu => DType::BF16,
        DTypeChoice::Auto => DType::F32,
    };
    Ok(LoadOptions::new(Device::Cpu, dtype, quantize))
}

/// Whether MLX computes on a GPU (once [`mlx_load_options`] has chosen its device).
pub fn mlx_on_gpu() -> bool {
    #[cfg(feature = "mlx")]
    {
        crate::engine::mlx::device::on_gpu()
    }
    #[cfg(not(feature = "mlx"))]
    false
}

#[cfg(feature = "mlx")]
fn mlx_device(device: DeviceChoice) -> Result<bool> {
    crate::engine::mlx::device::select(device)
}

#[cfg(not(feature = "mlx"))]
fn mlx_device(_: DeviceChoice) -> Result<bool> {
    Err(no_mlx())
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceChoice::*;
    use EngineChoice::*;

    #[test]
    fn the_default_is_candle_except_a_gpu_with_mlx() {
        assert_eq!(resolve_for(None, Cpu, true, false).unwrap(), Candle);
        assert_eq!(resolve_for(None, Auto, true, false).unwrap(), Candle);
        assert_eq!(resolve_for(None, Metal, true, false).unwrap(), Mlx);
        assert_eq!(resolve_for(None, Cuda, true, false).unwrap(), Mlx);
        assert_eq!(resolve_for(None, Auto, true, true).unwrap(), Mlx);
        assert_eq!(resolve_for(None, Cpu, true, true).unwrap(), Candle);
        assert_eq!(resolve_for(None, Metal, false, true).unwrap(), Candle);
        // Without MLX, candle: whose --device cuda then says how to get MLX's CUDA build.
        assert_eq!(resolve_for(None, Cuda, false, false).unwrap(), Candle);
        assert_eq!(
            resolve_for(Some(Candle), Metal, true, true).unwrap(),
            Candle
        );
        assert_eq!(resolve_for(Some(Mlx), Cpu, true, false).unwrap(), Mlx);
    }

    #[test]
    fn mlx_without_the_feature_says_how_to_build_it() {
        let e = resolve_for(Some(Mlx), Cpu, false, false).unwrap_err();
        assert!(e.to_string().contains("scripts/build_mlx.sh"), "{e}");
    }
}
