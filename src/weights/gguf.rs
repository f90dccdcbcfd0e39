//! GGUF files (llama.cpp's format): model config from metadata, tensors dequantized to the
//! compute dtype, and llama.cpp's Q/K row permutation undone so that the weights match the
//! Hugging Face "rotate half" RoPE layout the forward pass uses.

use super::{all_finite, check_shape, read_exact_at, Float, WeightsError};
use crate::model::config::{Architecture, ConfigError, ModelConfig, RopeScaling};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// GGUF architectures we load, with the Hugging Face architecture each one maps to.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2"];

pub struct GgufFile {
    pub path: PathBuf,
    /// Read with positioned reads, never mapped (see the module docs of `weights`).
    file: File,
    pub content: Content,
    arch: String,
    /// Heads of the q and k projections, for undoing llama.cpp's permutation.
    unpermute_heads: Option<(usize, usize)>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let open_err = |reason: String| WeightsError::Open {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| open_err(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| open_err(e.to_string()))?.len();
        let content = Content::read(&mut BufReader::new(&file))
            .map_err(|e| open_err(format!("not a valid GGUF file: {e}")))?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(open_err(
                    "GGUF metadata has no `general.architecture`".into(),
                ))
            }
        };
        let mut g = GgufFile {
            path: path.to_path_buf(),
            file,
            content,
            arch,
            unpermute_heads: None,
        };
        // Every tensor must lie inside the file: a truncated download is caught here, at load,
        // rather than when the tensor is first needed.
        let data_start = g.content.tensor_data_offset;
        for (name, info) in &g.content.tensor_infos {
            // Dimensions come from the file: multiply with overflow checks.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let bytes = elems.and_then(|n| {
                (n / info.ggml_dtype.block_size().max(1) as u64)
                    .checked_mul(info.ggml_dtype.type_size() as u64)
            });
            let end = bytes.and_then(|b| data_start.checked_add(info.offset)?.checked_add(b));
            let Some(end) = end else {
                return Err(open_err(format!(
                    "tensor `{name}` has absurd dimensions {:?}",
                    info.shape.dims()
                )));
            };
            if end > file_len {
                return Err(open_err(format!(
                    "tensor `{name}` ends at byte {end} but the file has only {file_len} bytes; \
                     the file is truncated (download it again)"
                )));
            }
        }
        if g.arch == "llama" {
            let heads = g.meta_usize("attention.head_count").ok();
            let kv = g.meta_usize("attention.head_count_kv").ok().or(heads);
            if let (Some(h), Some(kv)) = (heads, kv) {
                g.unpermute_heads = Some((h, kv));
            }
        }
        Ok(g)
    }

    /// Average bytes per weight of the block linear layers when loaded with `--quantize`:
    /// tensors stored quantized stay in their own format, dense ones are quantized at
    /// `requantized` bytes per weight. None when the file has no block linears.
    pub fn quantized_linear_bytes(&self, requantized: f64) -> Option<f64> {
        let (mut bytes, mut weights) = (0f64, 0f64);
        for (name, info) in self.block_linears() {
            let n = info.shape.elem_count() as f64;
            bytes += n * self.bytes_per_weight(name, requantized)?;
            weights += n;
        }
        (weights > 0.0).then(|| bytes / weights)
    }

    /// The seven linear weights of every block, with how each is stored.
    fn block_linears(
        &self,
    ) -> impl Iterator<Item = (&String, &candle_core::quantized::gguf_file::TensorInfo)> {
        const LINEARS: [&str; 7] = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        self.content.tensor_infos.iter().filter(|(name, _)| {
            name.strip_prefix("blk.").is_some_and(|rest| {
                LINEARS.contains(&rest.split('.').nth(1).unwrap_or("")) && name.ends_with(".weight")
            })
        })
    }

    /// The formats the block linears are stored in, each once.
    pub fn linear_formats(&self) -> Vec<candle_core::quantized::GgmlDType> {
        let mut formats = vec![];
        for (_, info) in self.block_linears() {
            if !formats.contains(&info.ggml_dtype) {
                formats.push(info.ggml_dtype);
            }
        }
        formats
    }

    /// The float dtype every weight matrix (the block linears, the embeddings, the output) is
    /// stored in, when they share one (F32, F16, BF16); `None` otherwise (quantized or mixed).
    pub fn matrix_dtype(&self) -> Option<candle_core::DType> {
        use candle_core::quantized::GgmlDType as G;
        let mut formats = self
            .content
            .tensor_infos
            .values()
            .filter(|i| i.shape.dims().len() == 2)
            .map(|i| i.ggml_dtype);
        let first = formats.next()?;
        if formats.any(|f| f != first) {
            return None;
        }
        match first {
            G::F32 => Some(candle_core::DType::F32),
            G::F16 => Some(candle_core::DType::F16),
            G::BF16 => Some(candle_core::DType::BF16),
            _ => None,
        }
    }

    /// Bytes per weight tensor `name` will take under `--quantize`: a quantized tensor at its
    /// own format, a float one at `requantized`. `None` when the file has no such tensor.
    pub fn bytes_per_weight(&self, name: &str, requantized: f64) -> Option<f64> {
        use candle_core::quantized::GgmlDType as G;
        let info = self.content.tensor_infos.get(name)?;
        Some(match info.ggml_dtype {
            G::F32 | G::F16 | G::BF16 => requantized,
            q => q.type_size() as f64 / q.block_size() as f64,
        })
    }

    /// The largest tensor as stored: (bytes, elements).
    pub fn largest_tensor(&self) -> (u64, u64) {
        self.content
            .tensor_infos
            .values()
            .map(|i| {
                let elems = i.shape.elem_count() as u64;
                let dt = i.ggml_dtype;
                let bytes = elems / dt.block_size().max(1) as u64 * dt.type_size() as u64;
                (bytes, elems)
            })
            .max()
            .unwrap_or((0, 0))
    }

    pub fn architecture(&self) -> &str {
        &self.arch
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer metadata value of any integer type, under the `<arch>.` prefix.
    fn meta_usize(&self, key: &str) -> Result<usize, String> {
        let full = format!("{}.{key}", self.arch);
        match self.metadata(&full) {
            Some(v) => value_to_u64(v)
                .map(|x| x as usize)
                .ok_or_else(|| format!("metadata `{full}` is not an integer")),
            None => Err(format!("metadata `{full}` is missing")),
        }
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.metadata(&format!("{}.{key}", self.arch))? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            v => value_to_u64(v).map(|x| x as f64),
        }
    }

    /// The model configuration from GGUF metadata.
    pub fn config(&self) -> Result<ModelConfig, ConfigError> {
        let src = self.path.display().to_string();
        if self.meta_str("general.type") == Some("adapter") {
            return Err(ConfigError::AdapterNotModel { source_name: src });
        }
        let architecture = match self.arch.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(ConfigError::Unsupported {
                    source_name: src,
                    found: format!("{other} (GGUF general.architecture)"),
                })
            }
        };
        let field = |key: &str, problem: String| ConfigError::Field {
            source_name: src.clone(),
            field: format!("{}.{key}", self.arch),
            problem,
        };
        let req = |key: &str| self.meta_usize(key).map_err(|p| field(key, p));
        let hidden_size = req("embedding_length")?;
        let num_attention_heads = req("attention.head_count")?;
        let num_key_value_heads = self
            .meta_usize("attention.head_count_kv")
            .unwrap_or(num_attention_heads);
        let head_dim = self
            .meta_usize("attention.key_length")
            .or_else(|_| self.meta_usize("rope.dimension_count"))
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let embd = self.content.tensor_infos.get("token_embd.weight");
        let vocab_size = self
            .meta_usize("vocab_size")
            .ok()
            .or_else(|| match self.metadata("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => Some(a.len()),
                _ => None,
            })
            .or_else(|| embd.map(|e| e.shape.dims()[0]))
            .ok_or_else(|| field("vocab_size", "is missing".into()))?;
        let mut rope_scaling = None;
        if let Some(info) = self.content.tensor_infos.get("rope_freqs.weight") {
            let t = self
                .qtensor("rope_freqs.weight", &Device::Cpu)
                .and_then(|q| self.dequantized(q, "rope_freqs.weight", &Device::Cpu))
                .and_then(|t| {
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| WeightsError::Read {
                            tensor: "rope_freqs.weight".into(),
                            file: src.clone(),
                            reason: e.to_string(),
                        })
                })
                .map_err(|e| {
                    field(
                        "rope_freqs",
                        format!("cannot be read: {e} ({:?})", info.shape),
                    )
                })?;
            rope_scaling = Some(RopeScaling::Factors(t));
        } else if self.meta_str(&format!("{}.rope.scaling.type", self.arch)) == Some("linear") {
            if let Some(factor) = self.meta_f64("rope.scaling.factor") {
                rope_scaling = Some(RopeScaling::Linear { factor });
            }
        }
        let tok_id = |key: &str| self.metadata(key).and_then(value_to_u64).map(|v| v as u32);
        let mut eos_token_ids: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                .iter()
                .filter_map(|k| tok_id(k))
                .collect();
        eos_token_ids.dedup();
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .meta_f64("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.meta_usize("context_length").unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids,
        };
        cfg.validate(&src)?;
        Ok(cfg)
    }

    pub fn contains_hf(&self, hf_name: &str) -> bool {
        hf_to_gguf_name(hf_name)
            .map(|n| self.content.tensor_infos.contains_key(&n))
            .unwrap_or(false)
    }

    /// The quantized tensor as stored, without un-permuting.
    pub fn qtensor(&self, gguf_name: &str, device: &Device) -> Result<QTensor, WeightsError> {
        self.read(gguf_name, None, device)
    }

    /// The tensor `gguf_name` as stored, or only rows `rows` of a 2-D one (GGML blocks never
    /// straddle rows, so a row is a fixed run of bytes).
    fn read(
        &self,
        gguf_name: &str,
        rows: Option<Range<usize>>,
        device: &Device,
    ) -> Result<QTensor, WeightsError> {
        let file = self.path.display().to_string();
        let info =
            self.content
                .tensor_infos
                .get(gguf_name)
                .ok_or_else(|| WeightsError::Missing {
                    tensor: gguf_name.to_string(),
                    file: file.clone(),
                    arch: "llama",
                })?;
        let dt = info.ggml_dtype;
        if !SUPPORTED_GGML.contains(&dt) {
            return Err(WeightsError::Dtype {
                tensor: gguf_name.to_string(),
                file,
                dtype: format!("{dt:?}"),
                quant: ", or Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K in GGUF",
            });
        }
        let read_err = |reason: String| WeightsError::Read {
            tensor: gguf_name.to_string(),
            file: file.clone(),
            reason,
        };
        let mut dims = info.shape.dims().to_vec();
        let row_elems: usize = dims.iter().skip(1).product();
        let rows = rows.unwrap_or(0..dims.first().copied().unwrap_or(1));
        if dims.len() > 1 && !row_elems.is_multiple_of(dt.block_size()) && rows != (0..dims[0]) {
            return Err(read_err(format!(
                "cannot read rows of a {dims:?} {dt:?} tensor"
            )));
        }
        if let Some(n) = dims.first_mut() {
            if rows.start > rows.end || rows.end > *n {
                return Err(read_err(format!("rows {rows:?} out of range for {dims:?}")));
            }
            *n = rows.len();
        }
        let elems: usize = dims.iter().product();
        if !elems.is_multiple_of(dt.block_size()) {
            return Err(read_err(format!(
                "{elems} elements do not fill whole {dt:?} blocks"
            )));
        }
        let row_bytes = row_elems / dt.block_size() * dt.type_size();
        let offset =
            self.content.tensor_data_offset + info.offset + (rows.start * row_bytes) as u64;
        let mut raw = vec![0u8; elems / dt.block_size() * dt.type_size()];
        read_exact_at(&self.file, &mut raw, offset).map_err(|e| read_err(e.to_string()))?;
        if !finite_blocks(dt, &raw) {
            return Err(WeightsError::NonFinite {
                tensor: gguf_name.to_string(),
                file,
            });
        }
        qtensor_from_ggml(dt, &raw, dims, device).map_err(|e| read_err(e.to_string()))
    }

    fn dequantized(
        &self,
        q: QTensor,
        gguf_name: &str,
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        q.dequantize(device).map_err(|e| WeightsError::Read {
            tensor: gguf_name.to_string(),
            file: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Rows `rows` of the tensor with Hugging Face name `hf_name`, dequantized and checked. A
    /// q/k projection (whose rows llama.cpp permuted within each head) is read whole and cut.
    pub fn get_hf_rows(
        &self,
        hf_name: &str,
        shape: &[usize],
        rows: Range<usize>,
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        let (name, heads) = self.hf_tensor(hf_name, shape)?;
        let narrow_err = |e: candle_core::Error| WeightsError::Read {
            tensor: name.clone(),
            file: self.path.display().to_string(),
            reason: e.to_string(),
        };
        if heads.is_some() {
            let t = self.get_hf(hf_name, shape, device)?;
            return t.narrow(0, rows.start, rows.len()).map_err(narrow_err);
        }
        let q = self.read(&name, Some(rows), device)?;
        self.dequantized(q, &name, device)
    }

    /// The GGUF name of `hf_name`, checked against `shape`, and the heads to un-permute its
    /// rows by (q and k projections of a llama file).
    fn hf_tensor(
        &self,
        hf_name: &str,
        shape: &[usize],
    ) -> Result<(String, Option<usize>), WeightsError> {
        let file = self.path.display().to_string();
        let name = hf_to_gguf_name(hf_name).ok_or_else(|| WeightsError::Missing {
            tensor: hf_name.to_string(),
            file: file.clone(),
            arch: "llama",
        })?;
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| WeightsError::Missing {
                tensor: name.clone(),
                file: file.clone(),
                arch: "llama",
            })?;
        check_shape(&name, &file, shape, info.shape.dims())?;
        let heads = match (self.unpermute_heads, hf_name) {
            (Some((h, _)), n) if n.contains("self_attn.q_proj.") => Some(h),
            (Some((_, kv)), n) if n.contains("self_attn.k_proj.") => Some(kv),
            _ => None,
        };
        Ok((name, heads))
    }

    /// Loads the tensor with Hugging Face name `hf_name`, dequantized, un-permuted, checked.
    pub fn get_hf(
        &self,
        hf_name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        let (name, heads) = self.hf_tensor(hf_name, shape)?;
        let t = self.dequantized(self.read(&name, None, device)?, &name, device)?;
        match heads {
            Some(h) => unpermute_qk(&t, h).map_err(|e| WeightsError::Read {
                tensor: name,
                file: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            None => Ok(t),
        }
    }
}

/// Whether every value that `raw` (whole blocks of `dt`) stands for is finite: a float
/// tensor's values themselves; for a quantized one, its f16 scales and minimums, since its
/// quants are small integers, so its weights are finite exactly when those are.
fn finite_blocks(dt: GgmlDType, raw: &[u8]) -> bool {
    use GgmlDType as G;
    // Byte offsets of the f16 fields in one block, as ggml lays them out.
    let halves: &[usize] = match dt {
        G::F32 => return all_finite(raw, Float::F32),
        G::F16 => return all_finite(raw, Float::F16),
        G::BF16 => return all_finite(raw, Float::Bf16),
        G::Q4_0 | G::Q5_0 | G::Q8_0 => &[0],
        G::Q4_1 | G::Q5_1 | G::Q4K | G::Q5K => &[0, 2],
        G::Q6K => &[208],
        // Not read: SUPPORTED_GGML is checked first.
        _ => return true,
    };
    raw.chunks_exact(dt.type_size())
        .all(|b| halves.iter().all(|&o| all_finite(&b[o..o + 2], Float::F16)))
}

const SUPPORTED_GGML: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// Hugging Face tensor name → llama.cpp tensor name.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Undoes llama.cpp's interleaving of q/k rows (`[n, 2, d/2] → [n, d/2, 2]` at conversion).
pub fn unpermute_qk(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    permute_rows(t, n_heads, false)
}

/// Applies llama.cpp's q/k row interleaving, as its converter does (for writing GGUF).
pub fn permute_qk(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    permute_rows(t, n_heads, true)
}

fn permute_rows(t: &Tensor, n_heads: usize, forward: bool) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_heads / 2;
    let shape = if forward {
        (n_heads, 2, half, rest)
    } else {
        (n_heads, half, 2, rest)
    };
    t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f16 fields checked are the ones candle's own dequantizer reads: a NaN poked into
    /// any of them makes weights NaN, and the check sees it; untouched blocks pass.
    #[test]
    fn quantized_blocks_are_checked_at_their_scales() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (2, 512), &dev).unwrap();
        for dt in SUPPORTED_GGML
            .iter()
            .copied()
            .filter(|d| d.block_size() > 1)
        {
            let q = QTensor::quantize(&w, dt).unwrap();
            let raw = q.data().unwrap().to_vec();
            assert!(finite_blocks(dt, &raw), "{dt:?}");
            let halves: Vec<usize> = (0..dt.type_size() - 1)
                .filter(|&o| {
                    let mut bad = raw.clone();
                    bad[o..o + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
                    let t = qtensor_from_ggml(dt, &bad, vec![2, 512], &dev)
                        .unwrap()
                        .dequantize(&dev)
                        .unwrap();
                    let nan = t
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .any(|v| v.is_nan());
                    if nan {
                        assert!(!finite_blocks(dt, &bad), "{dt:?}: NaN at byte {o} not seen");
                    }
                    nan
                })
                .collect();
            assert!(!halves.is_empty(), "{dt:?}: no NaN could be poked in");
        }
        let floats: Vec<u8> = [1.0f32, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(!finite_blocks(GgmlDType::F32, &floats));
        assert!(finite_blocks(GgmlDType::F32, &floats[..4]));
    }

    #[test]
    fn permutation_round_trips_and_interleaves() {
        let t = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_qk(&t, 2).unwrap();
        // Head 0 rows 0..4 = [r0, r1 | r2, r3] become interleaved [r0, r2, r1, r3].
        let rows: Vec<f32> = p.get(1).unwrap().to_vec1().unwrap();
        assert_eq!(rows, vec![6., 7., 8.]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }
}
