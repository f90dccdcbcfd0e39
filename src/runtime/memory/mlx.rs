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

/// What MLX says of its default device: each key with a size (`memory_size`, and on Metal
/// `max_recommended_working_set_size`, `max_buffer_length`, …). Text values are left out.
pub fn device_sizes() -> Result<Vec<(String, u64)>, Exception> {
    let failed = || Exception::custom("MLX could not describe its device");
    let mut out = vec![];
    // SAFETY: every handle made here is freed here; strings MLX returns are copied before the
    // objects that own them are freed.
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        if mlx_sys::mlx_get_default_device(&mut dev) != 0 {
            mlx_sys::mlx_device_free(dev);
            return Err(failed());
        }
        let mut info = mlx_sys::mlx_device_info_new();
        let mut keys = mlx_sys::mlx_vector_string_new();
        let ok = mlx_sys::mlx_device_info_get(&mut info, dev) == 0
            && mlx_sys::mlx_device_info_get_keys(&mut keys, info) == 0;
        if ok {
            for i in 0..mlx_sys::mlx_vector_string_size(keys) {
                let mut key: *mut std::os::raw::c_char = std::ptr::null_mut();
                if mlx_sys::mlx_vector_string_get(&mut key, keys, i) != 0 || key.is_null() {
                    continue;
                }
                let mut size = 0usize;
                if mlx_sys::mlx_device_info_get_size(&mut size, info, key) == 0 {
                    let name = std::ffi::CStr::from_ptr(key).to_string_lossy().into_owned();
                    out.push((name, size as u64));
                }
            }
        }
        mlx_sys::mlx_vector_string_free(keys);
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(dev);
        if !ok {
            return Err(failed());
        }
    }
    Ok(out)
}

/// The memory an MLX run may plan with, from `sizes` ([`device_sizes`]) and the machine's
/// RAM: the device's memory (Metal's `memory_size`; RAM where MLX does not say), on Metal no
/// more than the recommended working set, past which macOS pages GPU memory out and runs slow
/// to a crawl, and on CUDA the GPU's free memory (`free_memory`, at most `total_memory`): MLX's
/// CUDA build keeps host-made arrays in managed memory, and asking for more of that than the
/// GPU has free can hang it.
pub fn plannable_memory(sizes: &[(String, u64)], ram: Option<u64>) -> Option<u64> {
    let get = |k: &str| {
        sizes
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| *v)
            .filter(|&v| v > 0)
    };
    let cuda = [get("free_memory"), get("total_memory")]
        .into_iter()
        .flatten()
        .min();
    let memory = get("memory_size").or(cuda).or(ram)?;
    Some(match get("max_recommended_working_set_size") {
        Some(w) => memory.min(w),
        None => memory,
    })
}

/// The memory an MLX run plans its budget against: [`plannable_memory`] of MLX's device (on the
/// CPU backend, which names no memory size, the machine's RAM).
pub fn device_memory() -> super::budget::DeviceMemory {
    let sizes = device_sizes().unwrap_or_default();
    let has = |key: &str| sizes.iter().any(|(k, _)| k == key);
    super::budget::DeviceMemory {
        kind: if has("max_recommended_working_set_size") {
            "unified memory (Metal's recommended working set)"
        } else if has("total_memory") {
            "GPU memory (MLX's CUDA device)"
        } else {
            "RAM"
        },
        total: plannable_memory(&sizes, super::total_ram()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlx_plans_with_its_device_s_memory_and_metal_s_working_set() {
        let gb = 1_000_000_000u64;
        // A 128 GB M3 Ultra as Metal describes it: 137.4 GB of memory, a working set below it.
        let metal = vec![
            ("memory_size".to_string(), 137_438_953_472),
            ("max_recommended_working_set_size".to_string(), 115 * gb),
            ("max_buffer_length".to_string(), 80 * gb),
        ];
        assert_eq!(plannable_memory(&metal, Some(137 * gb)), Some(115 * gb));
        // MLX's CPU backend names no sizes: the machine's RAM.
        assert_eq!(plannable_memory(&[], Some(24 * gb)), Some(24 * gb));
        assert_eq!(plannable_memory(&[], None), None);
        // A working set above the memory does not raise it.
        let odd = vec![
            ("memory_size".to_string(), 16 * gb),
            ("max_recommended_working_set_size".to_string(), 20 * gb),
        ];
        assert_eq!(plannable_memory(&odd, None), Some(16 * gb));
        // MLX's CUDA backend: the GPU's free memory, not the host's RAM.
        let h200 = vec![
            ("total_memory".to_string(), 150_754_820_096),
            ("free_memory".to_string(), 149_000_000_000),
            ("compute_capability_major".to_string(), 9),
        ];
        assert_eq!(
            plannable_memory(&h200, Some(128 * gb)),
            Some(149_000_000_000)
        );
    }
}
