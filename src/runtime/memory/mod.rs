//! Process memory as the operating system sees it: resident set now and at its peak, the
//! device's total, and the budget a run may use. On a CUDA GPU the budget's measure is the
//! GPU's memory instead ([`device`]); [`phase_peak`] and [`peak`] give whichever is the
//! measure.

pub mod budget;
pub mod device;

use std::sync::atomic::{AtomicU64, Ordering};

/// The process peak before the last [`reset_peak`], so [`peak_rss`] stays the whole run's.
static EARLIER_PEAK: AtomicU64 = AtomicU64::new(0);
/// The budget the training step checks itself against (u64::MAX: none).
static LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Arms the budget check of [`over_limit`].
pub fn set_limit(bytes: u64) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// The peak since the last [`reset_peak`] when it has crossed the armed limit. Checked between
/// blocks of a step, so a run stops itself before the operating system would kill it.
pub fn over_limit() -> Option<u64> {
    let limit = LIMIT.load(Ordering::Relaxed);
    if limit == u64::MAX {
        return None;
    }
    phase_peak().filter(|&p| p > limit)
}

/// The budget's measure at its peak since the last [`reset_peak`].
pub fn phase_peak() -> Option<u64> {
    by_measure(device::phase_peak, phase_peak_rss)
}

/// The budget's measure at its peak over the run.
pub fn peak() -> Option<u64> {
    by_measure(device::peak, peak_rss)
}

fn by_measure(gpu: fn() -> Option<u64>, resident: fn() -> Option<u64>) -> Option<u64> {
    if device::watching() {
        gpu()
    } else {
        resident()
    }
}

/// What the budget's measure is, for messages: "resident memory" or "GPU memory".
pub fn measure_name() -> &'static str {
    if device::watching() {
        "GPU memory"
    } else {
        "resident memory"
    }
}

/// Resident memory now, in bytes (Linux: VmRSS).
pub fn current_rss() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident memory of the process so far, in bytes (Linux: VmHWM).
pub fn peak_rss() -> Option<u64> {
    phase_peak_rss().map(|p| p.max(EARLIER_PEAK.load(Ordering::Relaxed)))
}

/// Peak resident memory since the last [`reset_peak`] (or the start), in bytes.
pub fn phase_peak_rss() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Starts a new peak measurement (Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM), so the
/// training phase's peak can be told apart from the load's (the watched GPU's too). Returns false
/// where resident memory's peak cannot be reset.
pub fn reset_peak() -> bool {
    device::reset_peak();
    if let Some(p) = phase_peak_rss() {
        EARLIER_PEAK.fetch_max(p, Ordering::Relaxed);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Memory the system can give without swapping, in bytes (Linux: MemAvailable).
pub fn available() -> Option<u64> {
    meminfo_kb("MemAvailable:").map(|kb| kb * 1024)
}

/// Physical memory of the machine, in bytes (Linux: MemTotal), lowered to the control group's
/// limit when the process runs in a container that has one.
pub fn total_ram() -> Option<u64> {
    let ram = meminfo_kb("MemTotal:")? * 1024;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(limit.map_or(ram, |l| l.min(ram)))
}

fn meminfo_kb(key: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Bytes as decimal gigabytes, for display.
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Hands the allocator's free heap pages back to the system (glibc's malloc_trim), so what was
/// just dropped stops counting as resident.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps resident memory flat from step to step, and the step's pages resident.
///
/// glibc's malloc raises its mmap threshold dynamically after large frees, after which buffers
/// of in-between sizes come from heap arenas whose resident size drifts with the shapes of
/// recent batches (measured: ±40 MB on SmolLM2 over 60 steps); a fixed threshold stops that.
/// At 32 MiB (glibc's largest default) a step's activations come from the heap, and the trim
/// threshold is set so that the heap is not handed back to the system when a step frees them:
/// the next step reuses those pages instead of faulting fresh zeroed ones (measured: page
/// faults were ~10% of a SmolLM2 step). The heap then holds the largest step's working set,
/// which the memory budget already covers, and the batcher puts the longest batch first so
/// that this high-water mark is reached at step 1 and stays flat after it.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("YOUR_AI_DEFAULT_MALLOC").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
