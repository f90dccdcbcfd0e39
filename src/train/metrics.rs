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
    /// checkpoint's own step, the start records stay (the file's first line must be one),
    /// and its training and validation, which came before the checkpoint; the rest (a run's
    /// test and end records) go, and so does the validation when the checkpoint has it still
    /// to do (`eval_pending`: one a later, killed resume did is done again). A torn line (a
    /// kill mid-write) goes too.
    pub fn resume(path: &Path, step: usize, eval_pending: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                    return false;
                };
                match v["step"].as_u64() {
                    Some(s) if (s as usize) < step => true,
                    Some(s) if s as usize == step => match v["type"].as_str() {
                        Some("start" | "train") => true,
                        Some("eval") => !eval_pending,
                        _ => false,
                    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_file_keeps_what_came_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let lines = [
            r#"{"type":"start","step":0}"#,
            r#"{"type":"eval","step":0}"#,
            r#"{"type":"train","step":1}"#,
            r#"{"type":"eval","step":1}"#,
            r#"{"type":"test","step":1}"#,
            r#"{"type":"end","step":1}"#,
            r#"{"type":"start","step":1}"#,
            r#"{"type":"train","step":2}"#,
            r#"{"type":"tra"#,
        ];
        let kept = |step: usize, pending: bool| {
            std::fs::write(&path, lines.join("\n")).unwrap();
            let mut m = Metrics::resume(&path, step, pending).unwrap();
            m.write(serde_json::json!({"type": "start", "step": step}))
                .unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            text.lines().map(str::to_string).collect::<Vec<_>>()
        };
        // From step 0 (a stop in step 1): the start record stays first.
        let k = kept(0, false);
        assert_eq!(k[..2], [lines[0], lines[1]]);
        assert_eq!(k.len(), 3);
        // From step 1: its training and validation stay, its test and end go, and the resume
        // before this one stays on record.
        let k = kept(1, false);
        assert_eq!(k[..5], [lines[0], lines[1], lines[2], lines[3], lines[6]]);
        // Its validation still to do: the one a killed resume wrote goes.
        let k = kept(1, true);
        assert!(!k.contains(&lines[3].to_string()), "{k:?}");
    }
}
