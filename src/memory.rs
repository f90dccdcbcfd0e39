//! Process memory as the operating system sees it: resident set now and at its peak.

/// Resident memory now, in bytes (Linux: VmRSS).
pub fn current_rss() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident memory of the process so far, in bytes (Linux: VmHWM).
pub fn peak_rss() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
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

/// Makes resident memory track live memory. glibc's malloc otherwise raises its mmap threshold
/// after large frees and serves later large buffers from heap arenas it rarely returns, so the
/// resident size drifts with the shapes of recent batches. Buffers of 256 KiB and more are
/// mapped and unmapped directly instead, and the arenas are trimmed eagerly.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("YOUR_AI_DEFAULT_MALLOC").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
        }
    }
}
