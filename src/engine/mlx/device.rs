//! `--device` for the MLX engine: which of MLX's devices runs the step.
//!
//! MLX has one GPU backend per build (Metal from source on a Mac, CUDA in the mlx-cuda wheels,
//! none in mlx-cpu) and runs on its default device, the GPU where it has one. Left alone,
//! `--device cpu` would run on Metal on a Mac, and `--device cuda` on a CPU-only MLX would
//! quietly run on the CPU; so the device is set here, before the budget is read from it, and
//! a device this MLX lacks is refused.

use crate::error::{Error, Result};
use crate::runtime::device::DeviceChoice;
use mlx_rs::{Device, DeviceType};

/// The GPU backend this binary's MLX was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Metal,
    Cuda,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Backend::Metal => "metal",
            Backend::Cuda => "cuda",
        }
    }
}

/// Which GPU backend this MLX has with a GPU present (`None`: CPU only, or no GPU). MLX's CUDA
/// build says it is available whether or not there is a GPU, so the GPUs are counted too.
pub fn gpu_backend() -> Option<Backend> {
    let query = |f: unsafe extern "C" fn(*mut bool) -> std::os::raw::c_int| {
        let mut yes = false;
        // SAFETY: the function writes one bool through the pointer it is given.
        (unsafe { f(&mut yes) } == 0) && yes
    };
    let mut gpus: std::os::raw::c_int = 0;
    // SAFETY: the function writes one int through the pointer it is given.
    let counted =
        unsafe { mlx_sys::mlx_device_count(&mut gpus, mlx_sys::mlx_device_type__MLX_GPU) };
    let present = counted == 0 && gpus > 0;
    if query(mlx_sys::mlx_metal_is_available) && present {
        Some(Backend::Metal)
    } else if query(mlx_sys::mlx_cuda_is_available) && present {
        Some(Backend::Cuda)
    } else {
        None
    }
}

/// Whether this binary links MLX's CUDA build (`scripts/build_mlx.sh --cuda`).
pub const CUDA_BUILD: bool = cfg!(mlx_cuda);

/// Whether `choice` runs on MLX's GPU with `backend` available, or why it cannot run.
/// `cuda_build`: MLX's CUDA build, which allocates all its memory through CUDA, so with no GPU
/// it cannot compute at all, not even on the CPU.
pub fn wants_gpu(choice: DeviceChoice, backend: Option<Backend>, cuda_build: bool) -> Result<bool> {
    if cuda_build && backend.is_none() {
        return Err(Error::Usage(
            "--engine mlx: this binary links MLX's CUDA build, which needs an NVIDIA GPU and its \
             driver even for --device cpu, and finds none here; on a machine without one, build \
             with scripts/build_mlx.sh (MLX's CPU build) or use --engine candle"
                .into(),
        ));
    }
    let missing = |asked: Backend| {
        let has = match backend {
            Some(b) => format!("its GPU backend is {}", b.flag()),
            None => "it has no GPU backend (the mlx-cpu wheel), or no GPU is present".into(),
        };
        let build = match asked {
            Backend::Metal => "build on a Mac with scripts/build_mlx.sh",
            Backend::Cuda => {
                "build with scripts/build_mlx.sh --cuda, on a machine with an NVIDIA driver"
            }
        };
        Error::Usage(format!(
            "--device {} --engine mlx: this binary's MLX cannot run there: {has}; {build}, \
             or use --device cpu",
            asked.flag()
        ))
    };
    match choice {
        DeviceChoice::Cpu => Ok(false),
        DeviceChoice::Auto => Ok(backend.is_some()),
        DeviceChoice::Metal if backend == Some(Backend::Metal) => Ok(true),
        DeviceChoice::Cuda if backend == Some(Backend::Cuda) => Ok(true),
        DeviceChoice::Metal => Err(missing(Backend::Metal)),
        DeviceChoice::Cuda => Err(missing(Backend::Cuda)),
    }
}

/// Makes MLX run on the device `choice` names (its GPU for `auto` where it has one); returns
/// whether that is a GPU.
pub fn select(choice: DeviceChoice) -> Result<bool> {
    let backend = gpu_backend();
    let gpu = wants_gpu(choice, backend, CUDA_BUILD)?;
    Device::set_default(&if gpu { Device::gpu() } else { Device::cpu() });
    if gpu && backend == Some(Backend::Cuda) {
        // Measured on an H200: a first step of ~50 s with MLX's quantized kernels on a
        // two-block model, and no step within two minutes at 8B, with nothing on the progress
        // line meanwhile (`--quantize` now multiplies dense copies there: weights.rs).
        eprintln!(
            "note: MLX compiles its CUDA kernels on first use (the first step can take \
             minutes); later runs reuse them from MLX_PTX_CACHE_DIR (default: mlx/ in the \
             temporary directory)"
        );
    }
    Ok(gpu)
}

/// Whether MLX's default device (as [`select`] set it) is a GPU.
pub fn on_gpu() -> bool {
    Device::try_default()
        .and_then(|d| d.get_type())
        .is_ok_and(|t| matches!(t, DeviceType::Gpu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceChoice::*;

    #[test]
    fn each_device_runs_where_this_mlx_can() {
        assert!(!wants_gpu(Cpu, Some(Backend::Metal), false).unwrap());
        assert!(!wants_gpu(Cpu, None, false).unwrap());
        assert!(wants_gpu(Auto, Some(Backend::Cuda), false).unwrap());
        assert!(!wants_gpu(Auto, None, false).unwrap());
        assert!(wants_gpu(DeviceChoice::Metal, Some(Backend::Metal), false).unwrap());
        assert!(wants_gpu(DeviceChoice::Cuda, Some(Backend::Cuda), false).unwrap());
    }

    #[test]
    fn a_device_this_mlx_lacks_is_refused_with_the_build_that_has_it() {
        let e = wants_gpu(DeviceChoice::Cuda, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device cuda --engine mlx"), "{e}");
        assert!(e.contains("build_mlx.sh --cuda"), "{e}");
        let e = wants_gpu(DeviceChoice::Metal, Some(Backend::Cuda), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("its GPU backend is cuda"), "{e}");
    }

    #[test]
    fn mlx_s_cuda_build_without_a_gpu_is_refused_even_for_the_cpu() {
        for choice in [Cpu, Auto, DeviceChoice::Cuda] {
            let e = wants_gpu(choice, None, true).unwrap_err().to_string();
            assert!(e.contains("needs an NVIDIA GPU"), "{e}");
        }
        assert!(!wants_gpu(Cpu, Some(Backend::Cuda), true).unwrap());
        assert!(wants_gpu(Auto, Some(Backend::Cuda), true).unwrap());
    }

    #[test]
    fn auto_runs_on_the_gpu_exactly_where_this_mlx_has_one() {
        // With the mlx-cpu wheel the tests here link, that is the CPU.
        let gpu = select(Auto).unwrap();
        assert_eq!(gpu, gpu_backend().is_some());
        let now = Device::try_default().unwrap().get_type().unwrap();
        assert_eq!(matches!(now, DeviceType::Gpu), gpu);
    }
}
