//! Named weight tensors from the files people have: a Hugging Face directory of safetensors
//! (single or sharded) or a GGUF file. Tensors are asked for by their Hugging Face name and
//! expected shape, so a missing, mis-shaped or unsupported tensor is an error that names it
//! instead of a silently zero-filled weight.
//!
//! Files are read with positioned reads, never memory-mapped: a mapped page that was read stays
//! resident (and counts against the memory budget) until the mapping goes, so mapping a 16 GB
//! bf16 checkpoint to quantize it to 5 GB peaked at 19 GB. Read tensor by tensor (or slice by
//! slice), the load peaks at the weights kept plus one piece in flight.

pub mod gguf;
pub mod safetensors_dir;

use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;

/// Bytes read from a weights file at a time, through one buffer, when a tensor is converted as
/// it is read (safetensors).
pub const READ_CHUNK: usize = 16 << 20;

/// Fills `buf` from `file` at byte `offset`, without moving a shared cursor.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

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
        match self {
            WeightStore::Safetensors(s) => s.get(name, shape, dtype, device),
            WeightStore::Gguf(g) => self.converted(name, g.get_hf(name, shape, device)?, dtype),
        }
    }

    /// As [`WeightStore::get`], only rows `rows` along the first dimension: a big matrix can
    /// be converted slice by slice without ever being whole in f32.
    pub fn get_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        match self {
            WeightStore::Safetensors(s) => s.get_rows(name, shape, rows, dtype, device),
            WeightStore::Gguf(g) => {
                let t = g.get_hf_rows(name, shape, rows, device)?;
                self.converted(name, t, dtype)
            }
        }
    }

    fn converted(&self, name: &str, t: Tensor, dtype: DType) -> Result<Tensor, WeightsError> {
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
