//! MLX's own memory: what its allocator has in use (active), its peak, and what it keeps cached
//! for reuse; and the limits a budget sets on it. On Apple silicon the cache is what makes the
//! process grow while MLX's reported peak stays flat, so the engine clears it every step and the
//! meter reports all three figures. On the CPU backend the memory limit is advisory.
//!
//! These are process-global in MLX: one run sets them once.

use mlx_rs::error::Exception;

/// One reading of MLX's allocator, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocator {
    /// In use by live arrays.
    pub active: u64,
    /// The highest `active` since the last [`reset_peak`].
    pub peak: u64,
    /// Freed buffers kept for reuse.
    pub cache: u64,
}

/// Reads the allocator once.
pub fn read() -> Result<Allocator, Exception> {
    Ok(Allocator {
        active: mlx_rs::memory::active_memory()? as u64,
        peak: mlx_rs::memory::peak_memory()? as u64,
        cache: mlx_rs::memory::cache_memory()? as u64,
    })
}

/// Starts a new peak measurement.
pub fn reset_peak() -> Result<(), Exception> {
    mlx_rs::memory::reset_peak_memory()
}

/// Hands the cached buffers back (to the system, or to Metal's heap).
pub fn clear_cache() -> Result<(), Exception> {
    mlx_rs::memory::clear_cache()
}

/// The most MLX may cache under a budget: a sixteenth of it, at most 2 GB. The step's
/// working set is freed and reallocated every step; a cache keeps the reuse within a step, and
/// clearing it after each step keeps the process from growing by what one step freed.
pub fn cache_limit_for(budget: u64) -> u64 {
    (budget / 16).min(2_000_000_000)
}

/// The limits a budget set on MLX, and what they were before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory: u64,
    pub previous_memory: u64,
    pub cache: u64,
    /// The wired limit, where MLX permits one (Metal on macOS 15 or later).
    pub wired: Option<u64>,
}

/// Sets MLX's memory limit to `budget`, its cache limit to `cache` (at most
/// [`cache_limit_for`] the budget; None: that), and its wired limit (where permitted) to the
/// budget. The pre-flight estimate counts the cache it gives here: the process holds MLX's
/// active memory and its cache.
pub fn apply_budget(budget: u64, cache: Option<u64>) -> Result<Limits, Exception> {
    let bytes = usize::try_from(budget).unwrap_or(usize::MAX);
    let previous = mlx_rs::memory::set_memory_limit(bytes)? as u64;
    let cache = cache.map_or(cache_limit_for(budget), |c| c.min(cache_limit_for(budget)));
    mlx_rs::memory::set_cache_limit(usize::try_from(cache).unwrap_or(usize::MAX))?;
    // Only Metal on macOS 15+ has a wired limit; where MLX refuses it, that is no error of
    // ours, and elsewhere there is none to set.
    #[cfg(target_os = "macos")]
    let wired = mlx_rs::memory::set_wired_limit(bytes).ok().map(|_| budget);
    #[cfg(not(target_os = "macos"))]
    let wired = None;
    Ok(Limits {
        memory: budget,
        previous_memory: previous,
        cache,
        wired,
    })
}

/// MLX's memory limit now.
pub fn memory_limit() -> Result<u64, Exception> {
    Ok(mlx_rs::memory::memory_limit()? as u64)
}
