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
