//! `metrics.jsonl`: one JSON object per line (a start record, one per step, evaluations, the
//! end), written as the run goes and continued exactly by a resumed run.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends one JSON object per line to the metrics file.
pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Continues a metrics file from a checkpoint at `step`: later lines (written after the
    /// checkpoint by the interrupted run) are dropped so every step appears once. Of the
    /// checkpoint's own step, its training and validation come before the checkpoint and
    /// stay; the rest (a run's test and end records, an earlier resume's start) go. A torn
    /// line (a kill mid-write) goes too.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                    return false;
                };
                match v["step"].as_u64() {
                    Some(s) if (s as usize) < step => true,
                    Some(s) if s as usize == step => v["type"] == "train" || v["type"] == "eval",
                    _ => false,
                }
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::io::write_file(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// One whole line in one write: a kill leaves a line complete or absent (the file is
    /// unbuffered; `writeln!` wrote it in dozens of pieces).
    pub fn write(&mut self, v: serde_json::Value) -> Result<()> {
        let line = format!("{v}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io("write", &self.path, e))
    }
}
