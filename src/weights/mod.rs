//! Named weight tensors from the files people have: a Hugging Face directory of safetensors
//! (memory-mapped; single or sharded) or a GGUF file. Tensors are asked for by their Hugging Face
//! name and expected shape, so a missing, mis-shaped or unsupported tensor is an error that names
//! it instead of a silently zero-filled weight.

pub mod gguf;
pub mod safetensors_dir;

use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

pub use gguf::GgufFile;
pub use safetensors_dir::SafetensorsDir;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    #[error(
        "{}: no weights found (expected model.safetensors or model.safetensors.index.json)",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error(
        "{file}: tensor `{tensor}` is missing; the file is incomplete or not a {arch} checkpoint"
    )]
    Missing {
        tensor: String,
        file: String,
        arch: &'static str,
    },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, the config says {expected:?}")]
    Shape {
        tensor: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: tensor `{tensor}` has dtype {dtype}, which is not supported (use F32, F16 or BF16{quant})")]
    Dtype {
        tensor: String,
        file: String,
        dtype: String,
        quant: &'static str,
    },
    #[error("{file}: cannot read tensor `{tensor}`: {reason}")]
    Read {
        tensor: String,
        file: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Format { file: String, reason: String },
}

/// Where a model's tensors come from.
pub enum WeightStore {
    Safetensors(SafetensorsDir),
    Gguf(GgufFile),
}

impl WeightStore {
    /// Whether a tensor with this Hugging Face name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightStore::Safetensors(s) => s.contains(name),
            WeightStore::Gguf(g) => g.contains_hf(name),
        }
    }

    /// Loads the tensor `name` (Hugging Face naming), checks its shape and converts it to
    /// `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        let t = match self {
            WeightStore::Safetensors(s) => s.get(name, shape, device)?,
            WeightStore::Gguf(g) => g.get_hf(name, shape, device)?,
        };
        t.to_dtype(dtype).map_err(|e| WeightsError::Read {
            tensor: name.to_string(),
            file: self.describe(),
            reason: e.to_string(),
        })
    }

    /// A short description of the source for messages.
    pub fn describe(&self) -> String {
        match self {
            WeightStore::Safetensors(s) => s.describe(),
            WeightStore::Gguf(g) => g.path.display().to_string(),
        }
    }
}

pub(crate) fn check_shape(
    tensor: &str,
    file: &str,
    expected: &[usize],
    found: &[usize],
) -> Result<(), WeightsError> {
    if expected != found {
        return Err(WeightsError::Shape {
            tensor: tensor.to_string(),
            file: file.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}
