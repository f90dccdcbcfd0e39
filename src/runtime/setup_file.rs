//! What `your_ai setup` saves in the user's config directory: the machine's hardware, and the
//! best configuration `your_ai benchmark` measured per model (which `train --auto-optimize`
//! reads).

use crate::error::{Error, Result};
use crate::runtime::hardware::Hardware;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file's name in the config directory.
pub const FILE_NAME: &str = "setup.json";

/// The best configuration the benchmark found for one model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Best {
    pub batch_size: usize,
    pub max_seq_length: usize,
    pub lora_rank: usize,
    pub tokens_per_s: f64,
    pub peak_bytes: u64,
    pub budget_bytes: u64,
    /// `--quantize` of the best configuration (None: the model's own dtype).
    #[serde(default)]
    pub quantize: Option<u8>,
}

/// What `setup` saves.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub hardware: Hardware,
    /// Best benchmarked configuration per model (the `--model` value, or its full path).
    #[serde(default)]
    pub best: BTreeMap<String, Best>,
}

/// Where the file lives: `$YOUR_AI_CONFIG_DIR`, else the user's config directory
/// (`$XDG_CONFIG_HOME` or `~/.config`; `~/Library/Application Support` on macOS). Empty
/// variables are unset ones; with no home directory either, there is no place for it (a
/// relative path would put it wherever the command ran, where no later one finds it).
pub fn path() -> Result<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("YOUR_AI_CONFIG_DIR") {
        return Ok(d.join(FILE_NAME));
    }
    let home = || {
        var("HOME").ok_or_else(|| {
            Error::Usage(
                "the setup file has no place: HOME is not set; set YOUR_AI_CONFIG_DIR to the \
                 directory to keep it in"
                    .into(),
            )
        })
    };
    let base = match var("XDG_CONFIG_HOME") {
        Some(x) => x,
        None if cfg!(target_os = "macos") => home()?.join("Library/Application Support"),
        None => home()?.join(".config"),
    };
    Ok(base.join("your_ai").join(FILE_NAME))
}

/// The key a model's best configuration is saved under.
pub fn model_key(spec: &str) -> String {
    std::fs::canonicalize(spec)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| spec.to_string())
}

/// The saved file, if `setup` (or a benchmark) has written one.
pub fn load() -> Result<Option<Saved>> {
    load_from(&path()?)
}

/// [`load`] for `setup`, which writes the file again: a damaged one is moved aside (to
/// `setup.json.damaged`, with a warning) rather than refused, or setup could never repair it.
pub fn load_or_set_aside() -> Result<Option<Saved>> {
    let path = path()?;
    match load_from(&path) {
        Err(Error::Usage(why)) => {
            let aside = path.with_extension("json.damaged");
            std::fs::rename(&path, &aside).map_err(|e| Error::io("move aside", &path, e))?;
            eprintln!(
                "warning: {why}\nmoved it to {}; its saved benchmark results are lost",
                aside.display()
            );
            Ok(None)
        }
        loaded => loaded,
    }
}

fn load_from(path: &Path) -> Result<Option<Saved>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::Usage(format!(
            "{}: not a file your_ai setup wrote ({e}); run `your_ai setup` to write it again",
            path.display()
        ))
    })
}

/// Writes the file whole (temporary file, then rename).
pub fn save(p: &Saved) -> Result<PathBuf> {
    let path = path()?;
    let text = serde_json::to_string_pretty(p).unwrap_or_default();
    crate::io::write_file(&path, text.as_bytes())?;
    Ok(path)
}

/// Records a benchmark's best configuration for `model`, creating the file if needed.
pub fn record_best(model: &str, best: Best) -> Result<PathBuf> {
    let mut p = load()?.unwrap_or_else(|| Saved {
        hardware: Hardware::detect(),
        best: BTreeMap::new(),
    });
    p.best.insert(model_key(model), best);
    save(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert!(load_from(&path).unwrap().is_none());
        let p = Saved {
            hardware: Hardware::detect(),
            best: BTreeMap::from([(
                "m".to_string(),
                Best {
                    batch_size: 4,
                    max_seq_length: 512,
                    lora_rank: 8,
                    tokens_per_s: 90.0,
                    peak_bytes: 1,
                    budget_bytes: 2,
                    quantize: Some(4),
                },
            )]),
        };
        std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(load_from(&path).unwrap(), Some(p.clone()));
        // A file saved before `quantize` existed still loads.
        let old = serde_json::to_string(&p)
            .unwrap()
            .replace(",\"quantize\":4", "");
        assert!(!old.contains("quantize"), "{old}");
        std::fs::write(&path, old).unwrap();
        assert_eq!(load_from(&path).unwrap().unwrap().best["m"].quantize, None);
        std::fs::write(&path, "{").unwrap();
        let e = load_from(&path).unwrap_err().to_string();
        assert!(e.contains("your_ai setup"), "{e}");
    }
}
