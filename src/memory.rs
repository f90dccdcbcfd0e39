//! Process memory as the operating system sees it: resident set now and at its peak.

/// Resident memory now, in bytes (Linux: VmRSS).
pub fn current_rss() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident memory of the process so far, in bytes (Linux: VmHWM).
pub fn peak_rss() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Memory the system can give without swapping, in bytes (Linux: MemAvailable).
pub fn available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
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

/// Keeps resident memory flat from step to step. glibc's malloc raises its mmap threshold
/// dynamically after large frees, after which buffers of in-between sizes come from heap arenas
/// whose resident size drifts with the shapes of recent batches (measured: ±40 MB on SmolLM2
/// over 60 steps). A fixed threshold stops that (±1 MB). 4 MiB keeps page-fault cost low: a
/// 256 KiB threshold made every activation a fresh mapping and cost ~0.9 s of system time a step.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("YOUR_AI_DEFAULT_MALLOC").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        }
    }
}
