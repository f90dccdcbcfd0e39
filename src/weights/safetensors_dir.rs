//! Hugging Face safetensors checkpoints, single-file or sharded, read tensor by tensor with
//! positioned reads: nothing is memory-mapped, so no page of a 16 GB bf16 file counts as the
//! process's memory while an 8B model loads. Each tensor (or run of its rows) is read in
//! [`READ_CHUNK`] pieces through one buffer and converted straight into its final dtype, so the
//! load's peak is the weights held so far plus one buffer.

use super::{all_finite, check_shape, read_exact_at, Float, WeightsError, READ_CHUNK};
use candle_core::{DType, Device, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A safetensors header larger than this is not a checkpoint (Llama-70B's is under 100 kB).
const MAX_HEADER: u64 = 100 << 20;

pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<PathBuf>,
    shards: Vec<File>,
    tensors: HashMap<String, Entry>,
}

/// Where one tensor lies: its shard, dtype, shape and absolute byte range.
struct Entry {
    shard: usize,
    dtype: String,
    shape: Vec<usize>,
    start: u64,
}

impl SafetensorsDir {
    /// Opens `model.safetensors`, or every shard named in `model.safetensors.index.json`, and
    /// reads their headers (the tensors are read when asked for).
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
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if !f.is_file() {
                return Err(WeightsError::Open {
                    path: f.clone(),
                    reason: "shard listed in model.safetensors.index.json does not exist".into(),
                });
            }
            let file = File::open(f).map_err(|e| WeightsError::Open {
                path: f.clone(),
                reason: e.to_string(),
            })?;
            for (name, entry) in read_header(&file, i).map_err(|reason| WeightsError::Open {
                path: f.clone(),
                reason: format!("{reason} (the file is truncated or not a safetensors file)"),
            })? {
                tensors.entry(name).or_insert(entry);
            }
            shards.push(file);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            shards,
            tensors,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The float dtype every weight matrix (the block linears, the embeddings, the head) is
    /// stored in, when they share one; `None` otherwise.
    pub fn matrix_dtype(&self) -> Option<candle_core::DType> {
        let mut dtypes = self
            .tensors
            .values()
            .filter(|e| e.shape.len() == 2)
            .map(|e| e.dtype.as_str());
        let first = dtypes.next()?;
        if dtypes.any(|d| d != first) {
            return None;
        }
        Some(match Source::parse(first)? {
            Source::F64 => candle_core::DType::F64,
            Source::F32 => candle_core::DType::F32,
            Source::F16 => candle_core::DType::F16,
            Source::Bf16 => candle_core::DType::BF16,
        })
    }

    pub fn describe(&self) -> String {
        if self.files.len() == 1 {
            self.files[0].display().to_string()
        } else {
            format!("{} ({} shards)", self.dir.display(), self.files.len())
        }
    }

    /// The tensor `name`, checked against `shape`, in `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        self.get_rows(
            name,
            shape,
            0..shape.first().copied().unwrap_or(1),
            dtype,
            device,
        )
    }

    /// Rows `rows` (along the first dimension) of the tensor `name`, checked against `shape`,
    /// in `dtype` on `device`: only those rows are read.
    pub fn get_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        let file = self.describe();
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::Missing {
                tensor: name.to_string(),
                file: file.clone(),
                arch: "Llama-family",
            })?;
        let Some(src) = Source::parse(&e.dtype) else {
            return Err(WeightsError::Dtype {
                tensor: name.to_string(),
                file,
                dtype: e.dtype.clone(),
                quant: "",
            });
        };
        check_shape(name, &file, shape, &e.shape)?;
        let row_elems: usize = e.shape.iter().skip(1).product();
        let mut out_shape = e.shape.clone();
        match out_shape.first_mut() {
            Some(n) if rows.start <= rows.end && rows.end <= *n => *n = rows.len(),
            None if rows == (0..1) => {}
            _ => {
                return Err(WeightsError::Read {
                    tensor: name.to_string(),
                    file,
                    reason: format!("rows {rows:?} out of range for shape {:?}", e.shape),
                })
            }
        }
        let start = e.start + (rows.start * row_elems * src.size()) as u64;
        let count = rows.len() * row_elems;
        let read = Read {
            file: &self.shards[e.shard],
            src,
            start,
            count,
            shape: &out_shape,
        };
        let path = self.files[e.shard].display().to_string();
        let t = match dtype {
            DType::BF16 => read.read_as::<bf16>(),
            DType::F16 => read.read_as::<f16>(),
            // Other dtypes (none is asked for today) go through f32.
            _ => read
                .read_as::<f32>()
                .and_then(|t| t.to_dtype(dtype).map_err(|e| Failed::Io(e.to_string()))),
        };
        t.and_then(|t| t.to_device(device).map_err(|e| Failed::Io(e.to_string())))
            .map_err(|f| match f {
                Failed::Io(reason) => WeightsError::Read {
                    tensor: name.to_string(),
                    file: path,
                    reason,
                },
                Failed::NonFinite => WeightsError::NonFinite {
                    tensor: name.to_string(),
                    file: path,
                },
            })
    }
}

/// A stored dtype we convert from.
#[derive(Clone, Copy)]
enum Source {
    F64,
    F32,
    F16,
    Bf16,
}

impl Source {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::Bf16,
            _ => return None,
        })
    }

    fn float(self) -> Float {
        match self {
            Self::F64 => Float::F64,
            Self::F32 => Float::F32,
            Self::F16 => Float::F16,
            Self::Bf16 => Float::Bf16,
        }
    }

    fn size(self) -> usize {
        self.float().size()
    }

    /// Appends the little-endian values in `bytes` (whole elements) to `out`, converted.
    fn decode_into<T: WithDType>(self, bytes: &[u8], out: &mut Vec<T>) {
        let n = self.size();
        if self.decode_direct(bytes, out as &mut dyn Any) {
            return;
        }
        let chunks = bytes.chunks_exact(n);
        match self {
            // Through f32, which holds every value exactly: a same-dtype read is bit for bit.
            Self::Bf16 => {
                out.extend(chunks.map(|b| cast::<T>(bf16::from_le_bytes([b[0], b[1]]).to_f32())))
            }
            Self::F16 => {
                out.extend(chunks.map(|b| cast::<T>(f16::from_le_bytes([b[0], b[1]]).to_f32())))
            }
            Self::F32 => {
                out.extend(chunks.map(|b| cast::<T>(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))))
            }
            Self::F64 => out.extend(chunks.map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                T::from_f64(f64::from_le_bytes(a))
            })),
        }
    }
}

impl Source {
    /// [`Source::decode_into`] for the common cases, each a simple loop: a copy when the dtypes
    /// agree, an exact widening to f32, a single rounding of an f32 to bf16/f16. The generic
    /// path goes through `WithDType::from_f64`, which for bf16/f16 is a software conversion per
    /// element: a third of loading an 8B bf16 checkpoint in bf16 went there. False (nothing
    /// appended) for the other pairs.
    fn decode_direct(self, bytes: &[u8], out: &mut dyn Any) -> bool {
        fn f32_of(b: &[u8]) -> f32 {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        fn bf16_of(b: &[u8]) -> bf16 {
            bf16::from_le_bytes([b[0], b[1]])
        }
        fn f16_of(b: &[u8]) -> f16 {
            f16::from_le_bytes([b[0], b[1]])
        }
        let chunks = bytes.chunks_exact(self.size());
        if let Some(out) = out.downcast_mut::<Vec<bf16>>() {
            match self {
                Self::Bf16 => out.extend(chunks.map(bf16_of)),
                Self::F32 => out.extend(chunks.map(|b| bf16::from_f32(f32_of(b)))),
                _ => return false,
            }
        } else if let Some(out) = out.downcast_mut::<Vec<f16>>() {
            match self {
                Self::F16 => out.extend(chunks.map(f16_of)),
                Self::F32 => out.extend(chunks.map(|b| f16::from_f32(f32_of(b)))),
                _ => return false,
            }
        } else if let Some(out) = out.downcast_mut::<Vec<f32>>() {
            match self {
                Self::F32 => out.extend(chunks.map(f32_of)),
                Self::Bf16 => out.extend(chunks.map(|b| bf16_of(b).to_f32())),
                Self::F16 => {
                    // half's slice conversion uses F16C where the CPU has it.
                    let start = out.len();
                    out.resize(start + bytes.len() / 2, 0.0);
                    let halves: Vec<f16> = chunks.map(f16_of).collect();
                    halves.convert_to_f32_slice(&mut out[start..]);
                }
                Self::F64 => return false,
            }
        } else {
            return false;
        }
        true
    }
}

enum Failed {
    Io(String),
    NonFinite,
}

/// `count` elements of `src` in `file` from byte `start`, to become a tensor of `shape`.
struct Read<'a> {
    file: &'a File,
    src: Source,
    start: u64,
    count: usize,
    shape: &'a [usize],
}

impl Read<'_> {
    /// The elements as a `T` tensor, read [`READ_CHUNK`] bytes at a time through one buffer,
    /// each piece checked finite before it is converted.
    fn read_as<T: WithDType>(&self) -> Result<Tensor, Failed> {
        let size = self.src.size();
        let mut out: Vec<T> = Vec::new();
        out.try_reserve_exact(self.count)
            .map_err(|_| Failed::Io(format!("cannot allocate {} elements", self.count)))?;
        let per_chunk = (READ_CHUNK / size).max(1);
        let mut buf = vec![0u8; per_chunk.min(self.count) * size];
        let mut done = 0;
        while done < self.count {
            let n = per_chunk.min(self.count - done);
            let bytes = &mut buf[..n * size];
            read_exact_at(self.file, bytes, self.start + (done * size) as u64)
                .map_err(|e| Failed::Io(e.to_string()))?;
            if !all_finite(bytes, self.src.float()) {
                return Err(Failed::NonFinite);
            }
            self.src.decode_into(bytes, &mut out);
            done += n;
        }
        Tensor::from_vec(out, self.shape, &Device::Cpu).map_err(|e| Failed::Io(e.to_string()))
    }
}

/// Reads a shard's header: its tensors by name, each checked to lie inside the file with as
/// many bytes as its dtype and shape call for.
fn read_header(file: &File, shard: usize) -> Result<Vec<(String, Entry)>, String> {
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    read_exact_at(file, &mut len, 0).map_err(|e| format!("cannot read its header: {e}"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(format!(
            "its header claims {header_len} bytes in a {file_len}-byte file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    read_exact_at(file, &mut header, 8).map_err(|e| format!("cannot read its header: {e}"))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("its header is not JSON: {e}"))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let info: HeaderEntry =
            serde_json::from_value(v).map_err(|e| format!("header entry for `{name}`: {e}"))?;
        let [begin, end] = info.data_offsets;
        let elems = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let expected = elems
            .zip(Source::parse(&info.dtype))
            .map(|(n, s)| n * s.size() as u64);
        let fits = begin <= end && data_start.checked_add(end).is_some_and(|e| e <= file_len);
        if !fits || expected.is_some_and(|b| b != end - begin) {
            return Err(format!(
                "tensor `{name}` ({} {:?}) has data offsets {begin}..{end}, which do not fit \
                 the {} bytes after the header",
                info.dtype,
                info.shape,
                file_len - data_start
            ));
        }
        out.push((
            name,
            Entry {
                shard,
                dtype: info.dtype,
                shape: info.shape,
                start: data_start + begin,
            },
        ));
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
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

/// `v` in `T`, rounded once to nearest (ties to even). half's f64 to bf16/f16 conversions drop
/// an f64's low 32 bits before rounding, so a value just above a tie (the dropped bits are
/// f32's last three) could round down; from an f32 they round correctly, as candle's casts do.
fn cast<T: WithDType>(v: f32) -> T {
    match T::DTYPE {
        DType::BF16 => T::from_f64(bf16::from_f32(v).to_f64()),
        DType::F16 => T::from_f64(f16::from_f32(v).to_f64()),
        _ => T::from_f64(v as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// An f32 just above a bf16 tie (its last three mantissa bits, which half's f64 path
    /// drops, break the tie) rounds up, as candle's cast does.
    #[test]
    fn an_f32_just_above_a_tie_rounds_up_in_bf16() {
        let v = f32::from_bits(0x4040_8001); // just above the tie 3.0078125
        let via_candle = Tensor::new(&[v], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap()[0];
        let ours: bf16 = cast(v);
        assert_eq!(ours, via_candle);
        assert_eq!(ours.to_f32(), 3.015625);
        // The load's own path (the direct conversion) rounds the same way.
        let mut read: Vec<bf16> = vec![];
        Source::F32.decode_into(&v.to_le_bytes(), &mut read);
        assert_eq!(read, [via_candle]);
    }

    /// Our reader against candle's own safetensors loader (an independent implementation), for
    /// every stored and requested dtype, whole tensors and row ranges, across two shards.
    #[test]
    fn reads_what_candle_reads_in_every_dtype_and_row_range() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for (i, dt) in [DType::F32, DType::F16, DType::BF16, DType::F64]
            .into_iter()
            .enumerate()
        {
            let name = format!("t{i}");
            let shard = if i % 2 == 0 { &mut a } else { &mut b };
            shard.insert(name, base.to_dtype(dt).unwrap());
        }
        a.insert("norm".into(), Tensor::randn(0f32, 1.0, 24, &dev).unwrap());
        candle_core::safetensors::save(&a, tmp.path().join("a.safetensors")).unwrap();
        candle_core::safetensors::save(&b, tmp.path().join("b.safetensors")).unwrap();
        let mut map = serde_json::Map::new();
        for (shard, tensors) in [("a.safetensors", &a), ("b.safetensors", &b)] {
            for n in tensors.keys() {
                map.insert(n.clone(), shard.into());
            }
        }
        std::fs::write(
            tmp.path().join("model.safetensors.index.json"),
            serde_json::json!({ "weight_map": map }).to_string(),
        )
        .unwrap();
        let dir = SafetensorsDir::open(tmp.path()).unwrap();
        let all: HashMap<String, Tensor> = a.into_iter().chain(b).collect();
        for (name, stored) in &all {
            for want in [DType::F32, DType::F16, DType::BF16] {
                let expect = stored.to_dtype(want).unwrap();
                let shape = stored.dims().to_vec();
                let got = dir.get(name, &shape, want, &dev).unwrap();
                assert_eq!(got.dtype(), want);
                let diff = (got.to_dtype(DType::F64).unwrap()
                    - expect.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
                assert_eq!(diff, 0.0, "{name} ({:?}) read as {want:?}", stored.dtype());
                if shape.len() == 2 {
                    let rows = dir.get_rows(name, &shape, 5..19, want, &dev).unwrap();
                    let expect = expect.narrow(0, 5, 14).unwrap();
                    assert_eq!(
                        rows.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
                        expect
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_vec2::<f64>()
                            .unwrap()
                    );
                }
            }
        }
        assert!(dir
            .get_rows("t0", &[37, 24], 30..38, DType::F32, &dev)
            .is_err());
        let e = dir.get("t0", &[24, 37], DType::F32, &dev).unwrap_err();
        assert!(e.to_string().contains("has shape [37, 24]"), "{e}");
    }

    #[test]
    fn a_truncated_or_lying_header_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        let path = tmp.path().join("model.safetensors");
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), t)]), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let e = SafetensorsDir::open(tmp.path()).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        let e = SafetensorsDir::open(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("header claims"), "{e}");
    }
}
