//! Safetensors files written as the rest of our files are. A leaf: the model and the trainer
//! use it without reaching the crate's error type.

use std::path::Path;

/// Writes `tensors` as a safetensors file at `path`, readable as any file we create is. The
/// safetensors library writes through a temporary file of its own and leaves mode 0600, which
/// another user (or a server running as one) cannot read; here the file gets 0666 less the
/// umask, like the JSON beside it.
pub fn save_safetensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> candle_core::Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o666 & !umask();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The process's umask, read without changing it (Linux's /proc); 022 where it cannot be read.
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}
