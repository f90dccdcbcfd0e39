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
    #[error(
        "{file}: tensor `{tensor}` holds NaN or infinite values; the checkpoint is damaged \
         (download or convert it again)"
    )]
    NonFinite { tensor: String, file: String },
}

/// A stored float format, for checking values without converting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Float {
    F16,
    Bf16,
    F32,
    F64,
}

impl Float {
    pub(crate) fn size(self) -> usize {
        match self {
            Float::F16 | Float::Bf16 => 2,
            Float::F32 => 4,
            Float::F64 => 8,
        }
    }
}

/// Whether every little-endian `kind` value in `bytes` is finite: NaN and the infinities are
/// exactly the values whose exponent bits are all ones. No early exit, so the loop vectorizes;
/// the load checks every weight it reads.
pub(crate) fn all_finite(bytes: &[u8], kind: Float) -> bool {
    fn none_all_ones<const N: usize>(bytes: &[u8], mask: u64) -> bool {
        !bytes.chunks_exact(N).fold(false, |bad, b| {
            let mut v = [0u8; 8];
            v[..N].copy_from_slice(b);
            bad | (u64::from_le_bytes(v) & mask == mask)
        })
    }
    match kind {
        Float::F16 => none_all_ones::<2>(bytes, 0x7C00),
        Float::Bf16 => none_all_ones::<2>(bytes, 0x7F80),
        Float::F32 => none_all_ones::<4>(bytes, 0x7F80_0000),
        Float::F64 => none_all_ones::<8>(bytes, 0x7FF0_0000_0000_0000),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_is_every_value_but_nan_and_the_infinities() {
        let bf = |v: f32| half::bf16::from_f32(v).to_le_bytes().to_vec();
        let hf = |v: f32| half::f16::from_f32(v).to_le_bytes().to_vec();
        let f = |v: f32| v.to_le_bytes().to_vec();
        let d = |v: f64| v.to_le_bytes().to_vec();
        let finite = [0.0f32, -0.0, 1.5, -3e-8, 6.0e4, f32::MIN_POSITIVE / 4.0];
        for (kind, enc) in [
            (Float::Bf16, &bf as &dyn Fn(f32) -> Vec<u8>),
            (Float::F16, &hf),
            (Float::F32, &f),
            (Float::F64, &|v: f32| d(v as f64)),
        ] {
            let ok: Vec<u8> = finite.iter().flat_map(|&v| enc(v)).collect();
            assert!(all_finite(&ok, kind), "{kind:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut b = ok.clone();
                b.extend(enc(bad));
                b.extend(enc(1.0));
                assert!(!all_finite(&b, kind), "{kind:?} {bad}");
            }
        }
        assert!(all_finite(&d(f64::MAX), Float::F64));
        assert!(all_finite(&f(f32::MAX), Float::F32));
    }
}
