//! One call from `--model` to a ready model and tokenizer.

use super::quantized::QuantBits;
use super::{Llama, ModelConfig};
use crate::error::Result;
use crate::model_source::{self, ModelSource};
use crate::tokenizer::Tokenizer;
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
    let source = model_source::resolve(spec)?;
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

/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`; `org/name` → `name`.
pub fn model_name(spec: &str, source: &ModelSource) -> String {
    let from_spec = spec
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(spec);
    let base = match source {
        ModelSource::Gguf(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()),
        ModelSource::HfDir(_) if model_source::alias_repo(spec).is_some() => Some(spec.to_string()),
        ModelSource::HfDir(_) => Some(from_spec.to_string()),
    };
    base.filter(|s| !s.is_empty())
        .unwrap_or_else(|| "model".into())
}
