//! A merged model as a Hugging Face directory: config.json, safetensors (sharded with
//! `model.safetensors.index.json` above a size), tokenizer files with the chat template, and
//! generation_config.json. A GGUF base gets these files synthesized from its metadata.

use super::merge::Base;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::model::config::{Architecture, RopeScaling};
use crate::model::lora::Adapter;
use crate::model::ModelConfig;
use crate::weights::WeightStore;
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Shards above this size, as transformers' `save_pretrained` does by default.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// The output dtype for `--hf-dtype auto`: the HF base's own (its config's `torch_dtype`,
/// else its weights' headers; bf16 where they differ), f16 for a GGUF base (f16 keeps 11
/// mantissa bits, so a small LoRA update survives the cast better than in bf16).
pub fn auto_dtype(base: &Base) -> DType {
    match &base.store {
        WeightStore::Safetensors(weights) => read_json(&base.source.path().join("config.json"))
            .ok()
            .and_then(|c| crate::model::config::stored_dtype(&c))
            .or_else(|| weights.matrix_dtype())
            .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16))
            .unwrap_or(DType::BF16),
        WeightStore::Gguf(_) => DType::F16,
    }
}

fn torch_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Checks that the base can be expressed as a Hugging Face directory, before any work.
pub fn check(base: &Base) -> Result<()> {
    if let Some(RopeScaling::Factors(_)) = base.cfg.rope_scaling {
        return Err(Error::Usage(format!(
            "--model {}: the GGUF carries RoPE scaling as a `rope_freqs` tensor, which has no \
             config.json equivalent; fuse with --format gguf, or fuse onto the Hugging Face \
             checkpoint of this model",
            base.spec
        )));
    }
    Ok(())
}

/// Writes the merged model into `dir` (created here).
pub fn write(
    base: &Base,
    adapter: &Adapter,
    dir: &Path,
    dtype: DType,
    shard_bytes: u64,
) -> Result<()> {
    check(base)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    write_config(base, dir, dtype)?;
    write_weights(base, adapter, dir, dtype, shard_bytes.max(1))?;
    write_tokenizer(base, dir)
}

fn write_weights(
    base: &Base,
    adapter: &Adapter,
    dir: &Path,
    dtype: DType,
    shard_bytes: u64,
) -> Result<()> {
    let plan = base.tensor_plan();
    // Shards are planned from the shapes first so that their names (…-of-N) are known while
    // each is written as soon as it is full; only one shard's tensors are in memory at once.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut current = 0u64;
    let mut total = 0u64;
    for (name, shape) in plan {
        let bytes = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if current > 0 && current + bytes > shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        current += bytes;
        total += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name, shape));
        }
    }
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, shape) in shard {
            let t = base.merged(adapter, name, shape)?;
            let t = t
                .to_dtype(dtype)
                .map_err(|e| super::tensor_err(&format!("casting {name}"), e))?;
            tensors.insert(name.clone(), t);
            weight_map.insert(name.clone(), json!(file_name(i)));
        }
        let path = dir.join(file_name(i));
        crate::io::tensors::save_safetensors(&tensors, &path)
            .map_err(|e| Error::Export(format!("cannot write {}: {e}", path.display())))?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(())
}

fn write_config(base: &Base, dir: &Path, dtype: DType) -> Result<()> {
    let config = match &base.store {
        WeightStore::Safetensors(_) => {
            let mut c = read_json(&base.source.path().join("config.json"))?;
            if let Some(o) = c.as_object_mut() {
                o.insert("torch_dtype".into(), json!(torch_name(dtype)));
                if o.contains_key("dtype") {
                    o.insert("dtype".into(), json!(torch_name(dtype)));
                }
            }
            c
        }
        WeightStore::Gguf(_) => config_json(&base.cfg, dtype),
    };
    write_json(&dir.join("config.json"), &config)
}

/// A transformers config.json for a model known only from GGUF metadata.
pub fn config_json(c: &ModelConfig, dtype: DType) -> Value {
    let (arch, model_type) = match c.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let eos = match c.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let rope_scaling = match &c.rope_scaling {
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings}),
        _ => Value::Null,
    };
    json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": false,
        "hidden_act": "silu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": torch_name(dtype),
        "use_cache": true,
    })
}

/// Tokenizer files: copied from a Hugging Face base, synthesized from a GGUF base's metadata.
fn write_tokenizer(base: &Base, dir: &Path) -> Result<()> {
    match &base.store {
        WeightStore::Safetensors(_) => {
            let src = base.source.path();
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
                "tokenizer.model",
                "generation_config.json",
            ] {
                let from = src.join(f);
                if from.is_file() {
                    std::fs::copy(&from, dir.join(f)).map_err(|e| Error::io("copy", &from, e))?;
                }
            }
            if !src.join("generation_config.json").is_file() {
                write_generation_config(&base.cfg, &base.cfg.eos_token_ids, dir)?;
            }
            Ok(())
        }
        WeightStore::Gguf(g) => {
            let doc = crate::data::tokenizer::gguf::tokenizer_json(g)?;
            write_json(&dir.join("tokenizer.json"), &doc)?;
            let tok = Tokenizer::from_gguf(g)?;
            // Padding and unknown tokens by name, as transformers reads them (a later
            // conversion back to GGUF finds them there).
            let named = |key: &str| {
                g.metadata(key)
                    .and_then(|v| v.to_u32().ok())
                    .and_then(|id| tok.id_to_token(id))
            };
            let mut tc = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "add_bos_token": tok.add_bos,
                "add_eos_token": false,
                "clean_up_tokenization_spaces": false,
                "model_max_length": base.cfg.max_position_embeddings,
                "chat_template": tok.chat_template,
            });
            for (key, name) in [
                ("tokenizer.ggml.padding_token_id", "pad_token"),
                ("tokenizer.ggml.unknown_token_id", "unk_token"),
            ] {
                if let Some(t) = named(key) {
                    tc[name] = json!(t);
                }
            }
            write_json(&dir.join("tokenizer_config.json"), &tc)?;
            let ends: Vec<u32> = tok.end_ids.iter().copied().collect();
            write_generation_config(&base.cfg, &ends, dir)
        }
    }
}

fn write_generation_config(c: &ModelConfig, eos: &[u32], dir: &Path) -> Result<()> {
    let eos = match eos {
        [one] => json!(one),
        many => json!(many),
    };
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": c.bos_token_id, "eos_token_id": eos}),
    )
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Export(format!("{} is not valid JSON: {e}", path.display())))
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Export(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io("write", path, e))
}
