//! One call from `--model` to a ready model and tokenizer: [`load`].

use super::lora::Adapter;
use super::quantized::QuantBits;
use super::{Llama, ModelConfig};
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::model::source::{self, ModelSource};
use crate::weights::{GgufFile, SafetensorsDir, WeightStore};
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
    pub dtype: DType,
    /// The block linears kept at 4 or 8 bits (a quantized GGUF keeps its own format), the
    /// embeddings likewise and the LM head at 8; None: everything dense in `dtype`.
    pub quantize: Option<QuantBits>,
}

impl LoadOptions {
    /// Dense f32 on the CPU.
    pub fn cpu_f32() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            quantize: None,
        }
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
    let (mut model, tokenizer) = match &source {
        ModelSource::HfDir(dir) => {
            // Cheap checks first: config, weight headers, tokenizer; then the weights.
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let store = WeightStore::Safetensors(SafetensorsDir::open(dir)?);
            let tokenizer = Tokenizer::from_hf_dir(dir, &cfg.eos_token_ids)?;
            let model = Llama::load_with(&store, cfg, opts.dtype, &opts.device, opts.quantize)?;
            (model, tokenizer)
        }
        ModelSource::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let cfg = g.config()?;
            let tokenizer = Tokenizer::from_gguf(&g)?;
            let store = WeightStore::Gguf(g);
            let model = Llama::load_with(&store, cfg, opts.dtype, &opts.device, opts.quantize)?;
            (model, tokenizer)
        }
    };
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

/// What a model is, without its weights: for the memory estimate before anything big is read.
pub struct Inspected {
    pub source: ModelSource,
    pub cfg: ModelConfig,
    /// Bytes of the weight files (mapped, and so resident, while the model loads).
    pub weight_file_bytes: u64,
}

/// Reads the config of `spec` (a path, alias or repo id; a `config.json` file alone also works)
/// and sizes its weight files.
pub fn inspect(spec: &str) -> Result<Inspected> {
    let path = std::path::Path::new(spec);
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        let dir = path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        return Ok(Inspected {
            cfg: ModelConfig::from_hf_file(path)?,
            weight_file_bytes: 0,
            source: ModelSource::HfDir(dir),
        });
    }
    let source = source::resolve(spec)?;
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (cfg, weight_file_bytes) = match &source {
        ModelSource::HfDir(dir) => {
            let bytes = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                        .map(|p| size(&p))
                        .sum()
                })
                .unwrap_or(0);
            (ModelConfig::from_hf_file(&dir.join("config.json"))?, bytes)
        }
        ModelSource::Gguf(path) => (GgufFile::open(path)?.config()?, size(path)),
    };
    Ok(Inspected {
        source,
        cfg,
        weight_file_bytes,
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
