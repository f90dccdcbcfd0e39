//! The memory budget of a run: `--max-memory`, or a safe share of the device's memory.

use candle_core::Device;

/// Decimal gigabyte, the unit of `--max-memory` and of every printed figure.
pub const GB: f64 = 1e9;

/// Budgets are never chosen above this, whatever the machine (bigger runs say so themselves).
const AUTO_CAP: f64 = 120.0 * GB;
/// Share of the device's memory an automatic budget takes.
const AUTO_SHARE: f64 = 0.8;
/// A floor for the automatic budget, used only where the device still keeps its reserve.
const AUTO_FLOOR: f64 = 16.0 * GB;

/// What the run may use, and where that figure came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub bytes: u64,
    /// The device's total memory, when known.
    pub total: Option<u64>,
    /// Chosen by us rather than given with `--max-memory`.
    pub auto: bool,
}

/// The memory the operating system and other programs keep: 10% of the device, at least 2 GB
/// and at most 8 GB.
pub fn reserve(total: u64) -> u64 {
    (total as f64 * 0.1).clamp(2.0 * GB, 8.0 * GB) as u64
}

/// The automatic budget for a device with `total` bytes: 80% of it, at most 120 GB, never more
/// than the total less the reserve; 16 GB when 80% is less but 16 GB still leaves the reserve.
pub fn auto_budget(total: u64) -> u64 {
    let ceiling = total.saturating_sub(reserve(total)) as f64;
    let mut b = (total as f64 * AUTO_SHARE).min(AUTO_CAP).min(ceiling);
    if b < AUTO_FLOOR && AUTO_FLOOR <= ceiling {
        b = AUTO_FLOOR;
    }
    b as u64
}

/// Resolves `--max-memory` (GB) against the device's total memory.
pub fn resolve(max_memory: Option<f64>, total: Option<u64>) -> Result<Budget, String> {
    match (max_memory, total) {
        (Some(gb), _) if !(gb.is_finite() && gb > 0.0) => Err(format!(
            "--max-memory {gb}: give the budget in GB as a positive number, e.g. --max-memory 12"
        )),
        (Some(gb), Some(t)) if gb * GB > t as f64 => Err(format!(
            "--max-memory {gb}: this device has only {:.1} GB; give at most {:.1} (leaving room for the system, {:.1} is the safe default)",
            t as f64 / GB,
            t as f64 / GB,
            auto_budget(t) as f64 / GB
        )),
        (Some(gb), total) => Ok(Budget {
            bytes: (gb * GB) as u64,
            total,
            auto: false,
        }),
        (None, Some(t)) => Ok(Budget {
            bytes: auto_budget(t),
            total: Some(t),
            auto: true,
        }),
        (None, None) => Err(
            "the device's memory could not be detected; give a budget with --max-memory GB".into(),
        ),
    }
}

impl Budget {
    /// The two lines a run starts with.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![];
        let budget = show_gb(self.bytes);
        if self.auto {
            lines.push(format!(
                "No memory limit specified. Auto-detecting safe limit: {budget} GB"
            ));
        }
        lines.push(match self.total {
            Some(t) => format!(
                "Set memory limit to {budget} GB (device total {:.1} GB)",
                t as f64 / GB
            ),
            None => format!("Set memory limit to {budget} GB"),
        });
        lines
    }
}

/// GB with one decimal, two below 10 GB (where 0.85 should not read as 0.8).
pub fn show_gb(bytes: u64) -> String {
    let gb = bytes as f64 / GB;
    if gb < 10.0 {
        format!("{gb:.2}")
    } else {
        format!("{gb:.1}")
    }
}

/// The kind and size of the memory a device computes from.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMemory {
    /// "RAM", "GPU memory" or "unified memory".
    pub kind: &'static str,
    pub total: Option<u64>,
}

/// The memory of candle's `device`: RAM (or the container's limit) on the CPU, unified memory on
/// Apple silicon as the system reports it. (candle's CUDA device is not built: NVIDIA GPUs are
/// the MLX engine's, whose memory `runtime::memory::mlx` reads.)
pub fn device_memory(device: &Device) -> DeviceMemory {
    match device {
        Device::Cpu | Device::Cuda(_) => DeviceMemory {
            kind: "RAM",
            total: super::total_ram(),
        },
        Device::Metal(_) => DeviceMemory {
            kind: "unified memory",
            total: command_u64("sysctl", &["-n", "hw.memsize"]),
        },
    }
}

fn command_u64(program: &str, args: &[&str]) -> Option<u64> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gb(x: f64) -> u64 {
        (x * GB) as u64
    }

    #[test]
    fn budget_rule_over_device_sizes() {
        // (device total GB, expected automatic budget GB)
        let table = [
            (8.0, 6.0),     // 80% = 6.4 would leave less than the 2 GB reserve
            (16.0, 12.8),   // 80%; the 16 GB floor would eat the reserve
            (18.0, 16.0),   // the floor applies: 16 GB still leaves 2 GB
            (24.0, 19.2),   // 80%
            (64.0, 51.2),   // 80%
            (80.0, 64.0),   // an 80 GB GPU
            (128.0, 102.4), // 80%
            (192.0, 120.0), // the cap
        ];
        for (total, want) in table {
            let got = auto_budget(gb(total)) as f64 / GB;
            assert!((got - want).abs() < 1e-6, "{total} GB: {got} != {want}");
            assert!(got <= total - 2.0 + 1e-9, "{total} GB leaves the reserve");
        }
    }

    #[test]
    fn explicit_budget_checked_against_total() {
        let b = resolve(Some(70.0), Some(gb(128.0))).unwrap();
        assert_eq!(b.bytes, gb(70.0));
        assert!(!b.auto);
        assert_eq!(
            b.describe(),
            vec!["Set memory limit to 70.0 GB (device total 128.0 GB)".to_string()]
        );
        let err = resolve(Some(200.0), Some(gb(128.0))).unwrap_err();
        assert!(
            err.contains("--max-memory 200") && err.contains("128.0 GB"),
            "{err}"
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(resolve(Some(bad), Some(gb(16.0))).is_err());
        }
        let auto = resolve(None, Some(gb(128.0))).unwrap();
        assert_eq!(
            auto.describe(),
            vec![
                "No memory limit specified. Auto-detecting safe limit: 102.4 GB".to_string(),
                "Set memory limit to 102.4 GB (device total 128.0 GB)".to_string()
            ]
        );
        assert!(resolve(None, None).is_err());
        assert!(resolve(Some(8.0), None).is_ok());
    }
}
