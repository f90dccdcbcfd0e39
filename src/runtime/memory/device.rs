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
use std::sync::RwLock;

/// The device whose memory is watched; None: the process's resident memory is the measure.
static WATCHED: RwLock<Option<Device>> = RwLock::new(None);
/// The highest sample since the last [`reset_peak`] (0: none yet).
static PHASE_PEAK: AtomicU64 = AtomicU64::new(0);
/// The highest sample before the last [`reset_peak`].
static EARLIER_PEAK: AtomicU64 = AtomicU64::new(0);

/// Watches `device` when its memory can be read (a CUDA GPU); returns whether it is watched.
/// Any other device stops the watching.
pub fn watch(device: &Device) -> bool {
    let readable = read(device).is_some();
    if let Ok(mut w) = WATCHED.write() {
        *w = readable.then(|| device.clone());
    }
    PHASE_PEAK.store(0, Ordering::Relaxed);
    EARLIER_PEAK.store(0, Ordering::Relaxed);
    readable && used().is_some()
}

/// Whether a device's memory is the measure (see [`watch`]).
pub fn watching() -> bool {
    WATCHED.read().map(|w| w.is_some()).unwrap_or(false)
}

/// The watched device's memory in use now, in bytes; also raises the peak. None when nothing
/// is watched or the driver does not answer.
pub fn used() -> Option<u64> {
    let w = WATCHED.read().ok()?;
    let (free, total) = read(w.as_ref()?)?;
    let used = total.saturating_sub(free);
    PHASE_PEAK.fetch_max(used, Ordering::Relaxed);
    Some(used)
}

/// The highest sample since the last [`reset_peak`], sampling now first.
pub fn phase_peak() -> Option<u64> {
    used()?;
    Some(PHASE_PEAK.load(Ordering::Relaxed))
}

/// The highest sample of the run, sampling now first.
pub fn peak() -> Option<u64> {
    phase_peak().map(|p| p.max(EARLIER_PEAK.load(Ordering::Relaxed)))
}

/// Starts a new peak measurement (the training phase's, after loading).
pub fn reset_peak() {
    EARLIER_PEAK.fetch_max(PHASE_PEAK.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    used();
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
    fn the_cpu_is_not_watched_and_resident_memory_stays_the_measure() {
        assert!(!watch(&Device::Cpu));
        assert!(!watching());
        assert_eq!(used(), None);
        assert_eq!(phase_peak(), None);
        assert_eq!(peak(), None);
        reset_peak();
        assert_eq!(peak(), None);
    }
}
