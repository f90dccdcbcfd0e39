//! One call from `--model` to a ready model and tokenizer: [`load`].

use super::lora::Adapter;
use super::quantized::QuantBits;
use super::{Llama, ModelConfig};
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::model::sliced::SLICE_BYTES;
use crate::model::source::{self, ModelSource};
use crate::weights::{GgufFile, SafetensorsDir, WeightStore, READ_CHUNK};
use candle_core::{DType, Device};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// A short name for output directories and messages.
    pub name: String,
    pub load_time: Duration,
}

/// How a model is loaded: on which device, in which dtype, and whether its frozen weights stay
/// quantized in memory (QLoRA).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype computed in (activations, norms).
    pub dtype: DType,
    /// The dtype the dense frozen matrices are held in (block linears, embeddings, head):
    /// `dtype`, except where training, scoring and decoding on the CPU compute
    /// half-precision weights in f32 ([`LoadOptions::for_kernels`]).
    pub weight_dtype: DType,
    /// The block linears kept at 4 or 8 bits (a quantized GGUF keeps its own format), the
    /// embeddings likewise and the LM head at 8; None: everything dense in `weight_dtype`.
    pub quantize: Option<QuantBits>,
}

impl LoadOptions {
    /// Dense f32 on the CPU.
    pub fn cpu_f32() -> Self {
        Self::new(Device::Cpu, DType::F32, None)
    }

    /// Weights and arithmetic in `dtype` on `device`.
    pub fn new(device: Device, dtype: DType, quantize: Option<QuantBits>) -> Self {
        Self {
            device,
            dtype,
            weight_dtype: dtype,
            quantize,
        }
    }

    /// As the candle engine trains, scores and decodes: on the CPU, where the fused f32
    /// kernels run, bf16/f16 weights stay at half size and are computed in f32
    /// ([`crate::runtime::device::compute_dtype`]).
    pub fn for_kernels(self) -> Self {
        let dtype = crate::runtime::device::compute_dtype(self.weight_dtype, &self.device);
        Self { dtype, ..self }
    }
}

/// The one way a model is loaded, by every command and by `train --reload-interval`: `spec` (a
/// path, alias or repo id) to config, tokenizer and weights as `opts` says; with `adapter`, a
/// PEFT LoRA adapter directory applied.
pub fn load(spec: &str, opts: &LoadOptions, adapter: Option<&Path>) -> Result<LoadedModel> {
    let start = Instant::now();
    let source = source::resolve(spec)?;
    tracing::info!(
        "loading {spec} on {:?} in {:?}{}",
        opts.device,
        opts.dtype,
        opts.quantize.map_or(String::new(), |q| format!(
            ", quantized to {} bits",
            q.bits()
        ))
    );
    let (store, cfg, tokenizer) = open(&source)?;
    let mut model = Llama::load_mixed(
        &store,
        cfg,
        opts.dtype,
        opts.weight_dtype,
        &opts.device,
        opts.quantize,
    )?;
    drop(store);
    if opts.quantize.is_some() {
        tracing::info!(
            "frozen weights: {:.1} MB as loaded",
            model.frozen_weight_bytes() as f64 / 1e6
        );
    }
    if let Some(dir) = adapter {
        let a = Adapter::load_peft(dir, &model.cfg, &model.device)?;
        tracing::info!(
            "adapter {}: rank {}, {} parameters",
            dir.display(),
            a.cfg.rank,
            a.num_params()
        );
        model.adapter = Some(a);
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        name: model_name(spec, &source),
        source,
        load_time: start.elapsed(),
    })
}

/// Cheap checks first: config, weight headers (or a GGUF's metadata), tokenizer; the weights
/// are read after.
fn open(source: &ModelSource) -> Result<(WeightStore, ModelConfig, Tokenizer)> {
    Ok(match source {
        ModelSource::HfDir(dir) => {
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let store = WeightStore::Safetensors(SafetensorsDir::open(dir)?);
            let tokenizer = Tokenizer::from_hf_dir(dir, &cfg.eos_token_ids)?;
            (store, cfg, tokenizer)
        }
        ModelSource::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let cfg = g.config()?;
            let tokenizer = Tokenizer::from_gguf(&g)?;
            (WeightStore::Gguf(g), cfg, tokenizer)
        }
    })
}

/// A model's tokenizer and name, its weights unread: what training encodes its data with and
/// checks a resumed run against before the minutes a large model's load can take.
pub struct Identity {
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    pub name: String,
}

/// The [`Identity`] of `spec` (a path, alias or repo id).
pub fn identify(spec: &str) -> Result<Identity> {
    let source = source::resolve(spec)?;
    let (_, _, tokenizer) = open(&source)?;
    Ok(Identity {
        tokenizer,
        name: model_name(spec, &source),
        source,
    })
}

/// What a model is, without its weights: for the memory estimate before anything big is read.
pub struct Inspected {
    pub source: ModelSource,
    pub cfg: ModelConfig,
    /// The largest tensor of a GGUF file as stored (bytes, elements), which its load reads
    /// whole; zeros for safetensors, read in pieces.
    pub largest_stored: (u64, u64),
    /// The float dtype every weight matrix (block linears, embeddings, head) is stored in, when
    /// they share one: from the weights' headers, or for a config alone its `torch_dtype`.
    pub matrix_dtype: Option<DType>,
}

impl Inspected {
    /// The model a `config.json` describes, as a safetensors directory would load it, its
    /// matrices stored in `matrix_dtype` where the config says.
    pub fn from_config(cfg: ModelConfig, matrix_dtype: Option<DType>) -> Self {
        Self {
            source: ModelSource::HfDir(std::path::PathBuf::new()),
            cfg,
            largest_stored: (0, 0),
            matrix_dtype,
        }
    }

    /// Memory the load works in beside the weights it keeps, as [`load`] reads them. A
    /// safetensors tensor is read through one [`READ_CHUNK`] buffer straight into its dtype
    /// and, quantized, one slice at a time (the slice in f32 and the quantizer's own copy). A
    /// GGUF tensor is read whole (its bytes, then candle's copy), and dequantized to f32 first
    /// when a dense model is held in bf16/f16.
    pub fn load_work_bytes(&self, quantize: Option<QuantBits>, dtype_bytes: usize) -> u64 {
        let slice = 2 * SLICE_BYTES as u64;
        match self.source {
            ModelSource::HfDir(_) => READ_CHUNK as u64 + quantize.map_or(0, |_| slice),
            ModelSource::Gguf(_) => {
                let (bytes, elems) = self.largest_stored;
                let f32_copy = match quantize {
                    None if dtype_bytes < 4 => 4 * elems,
                    None => 0,
                    Some(_) => slice,
                };
                2 * bytes + f32_copy
            }
        }
    }
}

/// Reads the config of `spec` (a path, alias or repo id; a `config.json` file alone also works)
/// and, for a GGUF, the size of its largest tensor.
pub fn inspect(spec: &str) -> Result<Inspected> {
    let path = std::path::Path::new(spec);
    // What a config alone says the checkpoint is stored in.
    let config_dtype = |path: &std::path::Path| {
        let json = std::fs::read_to_string(path).ok();
        json.and_then(|t| serde_json::from_str(&t).ok())
            .and_then(|v| super::config::stored_dtype(&v))
    };
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        let cfg = ModelConfig::from_hf_file(path)?;
        return Ok(Inspected::from_config(cfg, config_dtype(path)));
    }
    let source = source::resolve(spec)?;
    let (cfg, largest_stored, matrix_dtype) = match &source {
        ModelSource::HfDir(dir) => (
            ModelConfig::from_hf_file(&dir.join("config.json"))?,
            (0, 0),
            // Headers only; a directory without weights (reported by the load itself) is
            // taken as its config says, as the config file alone is.
            match SafetensorsDir::open(dir) {
                Ok(s) => s.matrix_dtype(),
                Err(_) => config_dtype(&dir.join("config.json")),
            },
        ),
        ModelSource::Gguf(path) => {
            let g = GgufFile::open(path)?;
            (g.config()?, g.largest_tensor(), g.matrix_dtype())
        }
    };
    Ok(Inspected {
        source,
        cfg,
        largest_stored,
        matrix_dtype,
    })
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`; `org/name` → `name`.
pub fn model_name(spec: &str, source: &ModelSource) -> String {
    let from_spec = spec
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(spec);
    let base = match source {
        ModelSource::Gguf(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()),
        ModelSource::HfDir(_) if source::alias_repo(spec).is_some() => Some(spec.to_string()),
        ModelSource::HfDir(_) => Some(from_spec.to_string()),
    };
    base.filter(|s| !s.is_empty())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory holding a config alone is inspected as the config file is: its matrices
    /// in the config's `torch_dtype` (it gave f32, and so another estimate than the file).
    #[test]
    fn a_config_alone_is_read_alike_as_a_file_and_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 96, "torch_dtype": "bfloat16"});
        let file = tmp.path().join("config.json");
        std::fs::write(&file, config.to_string()).unwrap();
        for spec in [&file, tmp.path()] {
            let inspected = inspect(spec.to_str().unwrap()).unwrap();
            assert_eq!(
                inspected.matrix_dtype,
                Some(DType::BF16),
                "{}",
                spec.display()
            );
        }
    }
}
