//! What machine this is: processor, cores, memory and GPUs, for `recommend` and `setup`.

use crate::runtime::memory;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hardware {
    /// The processor's name ("Apple M2 Max", "AMD EPYC 7B13", ...).
    pub cpu: String,
    /// Physical cores (what the compute threads use), and hardware threads.
    pub cores: usize,
    pub threads: usize,
    /// RAM, or the container's limit when lower.
    pub memory_bytes: Option<u64>,
    /// GPUs with their memory in bytes, as the vendor tool reports them.
    pub gpus: Vec<(String, u64)>,
}

impl Hardware {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Hardware {
            cpu: cpu_name(&cpuinfo).unwrap_or_else(|| std::env::consts::ARCH.to_string()),
            cores: physical_cores(&cpuinfo).unwrap_or(threads).min(threads),
            threads,
            memory_bytes: memory::total_ram(),
            gpus: nvidia_gpus(),
        }
    }

    /// The memory training computes from: the largest GPU's when there is one, else RAM.
    pub fn compute_memory(&self) -> Option<u64> {
        self.gpus.iter().map(|g| g.1).max().or(self.memory_bytes)
    }

    pub fn describe(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        let gpus = if self.gpus.is_empty() {
            "no GPU".to_string()
        } else {
            self.gpus
                .iter()
                .map(|(n, m)| format!("{n} ({:.1} GB)", gb(*m)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{}, {} cores ({} threads), {} RAM, {gpus}",
            self.cpu,
            self.cores,
            self.threads,
            self.memory_bytes
                .map_or("unknown".into(), |m| format!("{:.1} GB", gb(m)))
        )
    }
}

/// Physical cores of this machine (hardware threads where that is all /proc/cpuinfo tells).
pub fn physical_cores_here() -> usize {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores(&cpuinfo).unwrap_or(threads).min(threads)
}

fn cpu_name(cpuinfo: &str) -> Option<String> {
    if let Some(name) = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
    {
        return Some(name);
    }
    // macOS: the chip's name from sysctl.
    let out = std::process::Command::new("sysctl")
        .args(["-n", "machdep.cpu.brand_string"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Distinct (physical id, core id) pairs of /proc/cpuinfo.
fn physical_cores(cpuinfo: &str) -> Option<usize> {
    let mut seen = std::collections::BTreeSet::new();
    let mut phys = "";
    for line in cpuinfo.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => phys = v.trim(),
                "core id" => {
                    seen.insert((phys.to_string(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    (!seen.is_empty()).then_some(seen.len())
}

/// NVIDIA GPUs and their memory, when the driver's tool is installed.
fn nvidia_gpus() -> Vec<(String, u64)> {
    let Ok(out) = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, mib) = l.rsplit_once(',')?;
            Some((
                name.trim().to_string(),
                mib.trim().parse::<u64>().ok()? << 20,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_counted_once_per_physical_core() {
        let info = "processor: 0\nmodel name: Test CPU\nphysical id: 0\ncore id: 0\n\n\
                    processor: 1\nmodel name: Test CPU\nphysical id: 0\ncore id: 0\n\n\
                    processor: 2\nmodel name: Test CPU\nphysical id: 0\ncore id: 1\n\n\
                    processor: 3\nmodel name: Test CPU\nphysical id: 1\ncore id: 0\n";
        assert_eq!(physical_cores(info), Some(3));
        assert_eq!(cpu_name(info).as_deref(), Some("Test CPU"));
    }

    #[test]
    fn detects_this_machine() {
        let h = Hardware::detect();
        assert!(h.cores >= 1 && h.threads >= h.cores);
        assert!(h.memory_bytes.is_some_and(|m| m > 0));
        assert!(h.describe().contains("cores"));
    }
}
