//! Getting models out: LoRA adapters merged into the base weights (`fuse`) and written as a
//! Hugging Face directory or a GGUF file, and adapters written on their own as a llama.cpp
//! LoRA GGUF (`export-adapter`). Every output is staged under a temporary name beside the
//! destination and renamed into place only when complete.

pub mod adapter_gguf;
pub mod gguf_stream;
pub mod gguf_tokenizer;
pub mod gguf_writer;
pub mod hf_dir;
pub mod merge;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A destination being written: `tmp` while in progress, renamed to `dest` by [`Staged::commit`].
/// Dropped without a commit (an error on the way), the temporary output is removed.
pub struct Staged {
    pub dest: PathBuf,
    pub tmp: PathBuf,
    committed: bool,
}

impl Staged {
    /// Refuses an existing `dest` unless `force`; creates the parent directory.
    pub fn new(dest: &Path, force: bool, flag: &str) -> Result<Self> {
        if dest.exists() && !force {
            return Err(Error::Usage(format!(
                "{flag} {}: already exists; choose another path or pass --force to replace it",
                dest.display()
            )));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty() && n != "..")
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{flag} {}: not a file or directory name",
                    dest.display()
                ))
            })?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("create", &parent, e))?;
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        remove_any(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Moves the finished output into place, replacing what `--force` allowed to replace.
    pub fn commit(mut self) -> Result<()> {
        sync_path(&self.tmp).map_err(|e| Error::io("sync", &self.tmp, e))?;
        if self.dest.exists() {
            remove_any(&self.dest).map_err(|e| Error::io("replace", &self.dest, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io("rename", &self.tmp, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_any(&self.tmp);
        }
    }
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// fsync of a file, or of every file in a directory, so the rename publishes complete data.
fn sync_path(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        for entry in std::fs::read_dir(p)? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::File::open(&path)?.sync_all()?;
            }
        }
        Ok(())
    } else {
        std::fs::File::open(p)?.sync_all()
    }
}

/// Tensor types of a GGUF export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output head and some attn_v/ffn_down.
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// Dtypes of a Hugging Face export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HfDtype {
    /// The base checkpoint's dtype (`torch_dtype` in config.json); f16 for a GGUF base.
    Auto,
    F32,
    F16,
    Bf16,
}

/// Output formats of `fuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Hf,
    Gguf,
}

pub(crate) fn tensor_err(what: &str, e: candle_core::Error) -> Error {
    Error::Export(format!("{what}: {e}"))
}
