//! Empirical distrust training: per-example loss weights from each example's authority weight
//! `w` and provenance entropy `H` ([`formula`]), the citation scorer that computes `w` and `H`
//! from text and metadata ([`scorer`], constants in [`table`]), corpus preparation
//! ([`prepare`]) and the prompt-suite check of a trained model ([`suite`]).

pub mod formula;
pub mod plot;
pub mod prepare;
pub mod scorer;
pub mod suite;
pub mod table;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DistrustError {
    /// Bad rows, each reported as `file:line: reason`.
    #[error("{count} invalid row(s):\n{}", shown.join("\n"))]
    Rows { count: usize, shown: Vec<String> },
    #[error("{}: the input holds no examples", path.display())]
    Empty { path: PathBuf },
    #[error("{what}")]
    Input { what: String },
}

/// How many bad rows are listed before "and N more".
const MAX_SHOWN: usize = 20;

impl DistrustError {
    /// Collects `file:line: reason` messages into one error.
    pub fn rows(errors: Vec<String>) -> Self {
        let count = errors.len();
        let mut shown: Vec<String> = errors.into_iter().take(MAX_SHOWN).collect();
        if count > MAX_SHOWN {
            shown.push(format!("... and {} more", count - MAX_SHOWN));
        }
        DistrustError::Rows { count, shown }
    }
}

/// Writes JSONL lines to `path` whole or not at all: into a temporary sibling, fsynced, then
/// renamed. An existing file is refused unless `force`.
pub fn write_jsonl_atomic(
    path: &std::path::Path,
    rows: &[serde_json::Map<String, serde_json::Value>],
    force: bool,
) -> crate::error::Result<()> {
    use crate::error::Error;
    use std::io::Write;
    if path.exists() && !force {
        return Err(Error::Usage(format!(
            "{} already exists; pass --force to replace it",
            path.display()
        )));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> crate::error::Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = std::io::BufWriter::new(f);
        for r in rows {
            serde_json::to_writer(&mut w, r)
                .map_err(|e| Error::io("write", &tmp, std::io::Error::other(e)))?;
            w.write_all(b"\n")
                .map_err(|e| Error::io("write", &tmp, e))?;
        }
        let f = w
            .into_inner()
            .map_err(|e| Error::io("write", &tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
