//! Memory of the accelerator a run computes on. On CUDA the budget is GPU memory, so the
//! training step measures the GPU's memory in use instead of resident memory: the driver's
//! total minus free, which counts this process's allocations, its allocator's pool and its
//! context, and any other process on the same GPU (what runs out is the GPU's memory, whoever
//! holds it). The CPU and Metal (unified memory, which resident memory already shows) watch
//! nothing here.
//!
//! The GPU is sampled where the step checks its budget (between blocks and after each step),
//! so a transient inside one block is seen only through what it leaves allocated; the
//! pre-flight estimate's slack covers that part.

use candle_core::Device;
use std::sync::atomic::{AtomicU64, Ordering};

/// A GPU whose memory is the budget's measure, with its highest samples.
#[derive(Debug)]
pub struct Gpu {
    device: Device,
    /// The highest sample since the last [`Gpu::reset_peak`] (0: none yet).
    phase_peak: AtomicU64,
    /// The highest sample before the last [`Gpu::reset_peak`].
    earlier_peak: AtomicU64,
}

impl Gpu {
    /// `device` when its memory can be read (a CUDA GPU); None for the CPU and Metal.
    pub fn watch(device: &Device) -> Option<Self> {
        read(device)?;
        let gpu = Self {
            device: device.clone(),
            phase_peak: AtomicU64::new(0),
            earlier_peak: AtomicU64::new(0),
        };
        gpu.used()?;
        Some(gpu)
    }

    /// Memory in use now, in bytes; also raises the peak. None when the driver does not answer.
    pub fn used(&self) -> Option<u64> {
        let (free, total) = read(&self.device)?;
        let used = total.saturating_sub(free);
        self.phase_peak.fetch_max(used, Ordering::Relaxed);
        Some(used)
    }

    /// The highest sample since the last [`Gpu::reset_peak`], sampling now first.
    pub fn phase_peak(&self) -> Option<u64> {
        self.used()?;
        Some(self.phase_peak.load(Ordering::Relaxed))
    }

    /// The highest sample of the run, sampling now first.
    pub fn peak(&self) -> Option<u64> {
        self.phase_peak()
            .map(|p| p.max(self.earlier_peak.load(Ordering::Relaxed)))
    }

    /// Starts a new peak measurement (the training phase's, after loading).
    pub fn reset_peak(&self) {
        let p = self.phase_peak.swap(0, Ordering::Relaxed);
        self.earlier_peak.fetch_max(p, Ordering::Relaxed);
        self.used();
    }
}

/// `(free, total)` bytes of a CUDA device's memory, from the driver.
#[cfg(feature = "cuda")]
fn read(device: &Device) -> Option<(u64, u64)> {
    let Device::Cuda(d) = device else {
        return None;
    };
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
fn read(_device: &Device) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_not_watched() {
        assert!(Gpu::watch(&Device::Cpu).is_none());
    }
}
