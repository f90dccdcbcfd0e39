//! Memory as the operating system and the device see it: resident set now and at its peak, the
//! device's total, the budget a run may use ([`budget`]), and the [`Meter`] a training run
//! reads it through. Under the MLX engine the measure is MLX's allocator (`mlx`, the `mlx`
//! feature): on a GPU, the device's memory.

pub mod budget;
#[cfg(feature = "mlx")]
pub mod mlx;

use std::sync::atomic::{AtomicU64, Ordering};

/// What the budget is measured in: the process's resident memory (CPU, and Apple's unified
/// memory under candle), or MLX's active memory (the MLX engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Resident,
    Mlx,
}

impl Measure {
    /// For messages: "resident memory" or "MLX memory".
    pub fn name(self) -> &'static str {
        match self {
            Measure::Resident => "resident memory",
            Measure::Mlx => "MLX memory",
        }
    }
}

/// The memory of one run, read as one value: its measure, the budget it must stay under, and
/// the peaks of the phase (loading, then training) and of the whole run.
#[derive(Debug)]
pub struct Meter {
    /// MLX's allocator is the measure (the MLX engine).
    mlx: bool,
    /// MLX's peak before the last [`Meter::reset_peak`].
    earlier_mlx_peak: AtomicU64,
    /// Bytes the step may reach before it stops (u64::MAX: no limit).
    limit: AtomicU64,
    /// The resident peak before the last [`Meter::reset_peak`], so the run's stays known.
    earlier_rss_peak: AtomicU64,
}

/// One sample of the meter: resident memory always, MLX's where it is the measure.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    pub rss: Option<u64>,
    pub rss_phase_peak: Option<u64>,
    pub rss_peak: Option<u64>,
    /// MLX's active memory and its peaks, where MLX is the measure.
    pub mlx: Option<u64>,
    pub mlx_phase_peak: Option<u64>,
    pub mlx_peak: Option<u64>,
    /// MLX's allocator cache, where MLX is the measure.
    pub cache: Option<u64>,
}

impl Reading {
    /// The measure now.
    pub fn now(&self) -> Option<u64> {
        self.mlx.or(self.rss)
    }
    /// The measure at its peak since the last reset.
    pub fn phase_peak(&self) -> Option<u64> {
        self.mlx_phase_peak.or(self.rss_phase_peak)
    }
    /// The measure at its peak over the run.
    pub fn peak(&self) -> Option<u64> {
        self.mlx_peak.or(self.rss_peak)
    }
}

impl Meter {
    /// A meter of resident memory: the candle engine's on any device (the CPU, or Apple's
    /// unified memory), and work outside a training run. No limit until [`Meter::set_limit`].
    pub fn resident() -> Self {
        Self {
            mlx: false,
            earlier_mlx_peak: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            earlier_rss_peak: AtomicU64::new(0),
        }
    }

    /// A meter of MLX's allocator (the MLX engine): its active memory, peak and cache.
    #[cfg(feature = "mlx")]
    pub fn mlx() -> Self {
        let mut m = Self::resident();
        m.mlx = true;
        m
    }

    /// MLX's allocator now, where it is the measure.
    fn allocator(&self) -> Option<(u64, u64, u64)> {
        if !self.mlx {
            return None;
        }
        #[cfg(feature = "mlx")]
        {
            mlx::read().ok().map(|a| (a.active, a.peak, a.cache))
        }
        #[cfg(not(feature = "mlx"))]
        None
    }

    pub fn measure(&self) -> Measure {
        if self.mlx {
            Measure::Mlx
        } else {
            Measure::Resident
        }
    }

    /// Arms [`Meter::over_limit`].
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Reads resident memory once (and MLX's allocator, where it is the measure).
    pub fn read(&self) -> Reading {
        let (rss, rss_phase_peak) = resident_now_and_peak();
        let rss_peak = rss_phase_peak.map(|p| p.max(self.earlier_rss_peak.load(Ordering::Relaxed)));
        if let Some((active, peak, cache)) = self.allocator() {
            return Reading {
                rss,
                rss_phase_peak,
                rss_peak,
                mlx: Some(active),
                mlx_phase_peak: Some(peak),
                mlx_peak: Some(peak.max(self.earlier_mlx_peak.load(Ordering::Relaxed))),
                cache: Some(cache),
            };
        }
        Reading {
            rss,
            rss_phase_peak,
            rss_peak,
            ..Reading::default()
        }
    }

    /// The measure at its peak since the last reset.
    pub fn phase_peak(&self) -> Option<u64> {
        if let Some((_, peak, _)) = self.allocator() {
            return Some(peak);
        }
        resident_now_and_peak().1
    }

    /// The measure at its peak over the run.
    pub fn peak(&self) -> Option<u64> {
        let r = self.read();
        if self.mlx {
            r.mlx_peak
        } else {
            r.rss_peak
        }
    }

    /// The phase's peak when it has crossed the limit. Checked between blocks of a step, so a
    /// run stops itself before the operating system would kill it.
    pub fn over_limit(&self) -> Option<u64> {
        let limit = self.limit();
        if limit == u64::MAX {
            return None;
        }
        self.phase_peak().filter(|&p| p > limit)
    }

    /// Starts a new peak measurement (Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM), so
    /// the training phase's peak can be told apart from the load's (MLX's too). Returns false
    /// where resident memory's peak cannot be reset.
    pub fn reset_peak(&self) -> bool {
        if let Some((_, peak, _)) = self.allocator() {
            self.earlier_mlx_peak.fetch_max(peak, Ordering::Relaxed);
            #[cfg(feature = "mlx")]
            let _ = mlx::reset_peak();
        }
        if let (_, Some(p)) = resident_now_and_peak() {
            self.earlier_rss_peak.fetch_max(p, Ordering::Relaxed);
        }
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
}

/// Resident memory now and its peak since the last reset, in bytes (Linux: VmRSS, VmHWM),
/// from one read of the process's status.
fn resident_now_and_peak() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    (status_kb(&status, "VmRSS:"), status_kb(&status, "VmHWM:"))
}

/// Resident memory now, in bytes (Linux: VmRSS).
pub fn current_rss() -> Option<u64> {
    resident_now_and_peak().0
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

fn status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
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
