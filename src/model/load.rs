//! One call from `--model` to a ready model and tokenizer.

use super::quantized::QuantBits;
use super::{Llama, ModelConfig};
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::model::source::{self, ModelSource};
use crate::weights::{GgufFile, SafetensorsDir, WeightStore};
use candle_core::{DType, Device};
use std::time::{Duration, Instant};

pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// A short name for output directories and messages.
    pub name: String,
    pub load_time: Duration,
}

/// Reads the config, tokenizer and weights named by `spec` (a path, alias or repo id).
pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<LoadedModel> {
    load_with(spec, device, dtype, None)
}

/// As [`load`], with the block weights kept quantized when `quant` is given (QLoRA).
pub fn load_with(
    spec: &str,
    device: &Device,
    dtype: DType,
    quant: Option<QuantBits>,
) -> Result<LoadedModel> {
    let start = Instant::now();
    let source = source::resolve(spec)?;
    let (model, tokenizer) = load_source_with(&source, device, dtype, quant)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        name: model_name(spec, &source),
        source,
        load_time: start.elapsed(),
    })
}

pub fn load_source(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
) -> Result<(Llama, Tokenizer)> {
    load_source_with(source, device, dtype, None)
}

pub fn load_source_with(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
    quant: Option<QuantBits>,
) -> Result<(Llama, Tokenizer)> {
    Ok(match source {
        ModelSource::HfDir(dir) => {
            // Cheap checks first: config, weight headers, tokenizer; then the weights.
            let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
            let store = WeightStore::Safetensors(SafetensorsDir::open(dir)?);
            let tokenizer = Tokenizer::from_hf_dir(dir, &cfg.eos_token_ids)?;
            (
                Llama::load_with(&store, cfg, dtype, device, quant)?,
                tokenizer,
            )
        }
        ModelSource::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let cfg = g.config()?;
            let tokenizer = Tokenizer::from_gguf(&g)?;
            let store = WeightStore::Gguf(g);
            (
                Llama::load_with(&store, cfg, dtype, device, quant)?,
                tokenizer,
            )
        }
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
