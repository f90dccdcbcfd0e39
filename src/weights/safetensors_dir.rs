//! Hugging Face safetensors checkpoints, single-file or sharded, memory-mapped: each tensor is
//! copied once, from the mapping into its compute-dtype buffer.

use super::{check_shape, WeightsError};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use safetensors::Dtype;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<PathBuf>,
    inner: MmapedSafetensors,
}

impl SafetensorsDir {
    /// Opens `model.safetensors`, or every shard named in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index.is_file() {
            shards_from_index(&index)?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(WeightsError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        for f in &files {
            if !f.is_file() {
                return Err(WeightsError::Open {
                    path: f.clone(),
                    reason: "shard listed in model.safetensors.index.json does not exist".into(),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every tool that maps checkpoints we rely
        // on nobody truncating them while we run.
        let inner =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| WeightsError::Open {
                path: if files.len() == 1 {
                    files[0].clone()
                } else {
                    dir.to_path_buf()
                },
                reason: format!("{e} (the file is truncated or not a safetensors file)"),
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            inner,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }

    pub fn describe(&self) -> String {
        if self.files.len() == 1 {
            self.files[0].display().to_string()
        } else {
            format!("{} ({} shards)", self.dir.display(), self.files.len())
        }
    }

    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        let file = self.describe();
        let view = self.inner.get(name).map_err(|_| WeightsError::Missing {
            tensor: name.to_string(),
            file: file.clone(),
            arch: "Llama-family",
        })?;
        match view.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {}
            other => {
                return Err(WeightsError::Dtype {
                    tensor: name.to_string(),
                    file,
                    dtype: format!("{other:?}"),
                    quant: "",
                })
            }
        }
        check_shape(name, &file, shape, view.shape())?;
        self.inner
            .load(name, device)
            .map_err(|e| WeightsError::Read {
                tensor: name.to_string(),
                file,
                reason: e.to_string(),
            })
    }
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let bad = |reason: String| WeightsError::Open {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains("..") && !f.starts_with('/'))
            .ok_or_else(|| {
                bad(format!(
                    "weight_map entry for `{tensor}` is not a plain file name"
                ))
            })?;
        names.insert(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}
