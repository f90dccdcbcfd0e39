//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata, and
//! checked so that an absurd or unsupported file fails here with the field named, not later
//! inside a matmul.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Architectures the forward pass implements. They share the Llama block; Qwen2 adds q/k/v
/// biases and Mistral an optional sliding attention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED_HF: &'static [&'static str] =
        &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
}

/// RoPE frequency scaling. Llama 3.1 ships `rope_type: llama3`; `linear` divides positions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f64,
    },
    /// Per-frequency divisors stored in a GGUF `rope_freqs.weight` tensor (llama.cpp's way of
    /// carrying Llama 3.1 scaling).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2, or Llama with `attention_bias: true`).
    pub attention_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: field `{field}` {problem}", source_name)]
    Field {
        source_name: String,
        field: String,
        problem: String,
    },
    #[error(
        "{source_name}: unsupported architecture `{found}`. your_ai supports {}; \
         pass a model of one of these architectures",
        Architecture::SUPPORTED_HF.join(", ")
    )]
    Unsupported { source_name: String, found: String },
    #[error(
        "{source_name} is a LoRA adapter (GGUF general.type = adapter), not a model: pass the \
         base model it adapts (llama.cpp applies this file with --lora)"
    )]
    AdapterNotModel { source_name: String },
}

/// Upper bounds that no real Llama-family model comes near; anything above is a corrupt file
/// and would otherwise turn into an enormous allocation.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 22;
/// The longest context a model may declare (16M tokens; the longest published is 10M).
const MAX_CONTEXT: usize = 1 << 24;

/// The dtype a Hugging Face `config.json` says the checkpoint is stored in (`torch_dtype`, or
/// `dtype` as newer transformers write it), when it names a float type.
pub fn stored_dtype(json: &Value) -> Option<candle_core::DType> {
    use candle_core::DType;
    match json
        .get("torch_dtype")
        .or_else(|| json.get("dtype"))?
        .as_str()?
    {
        "float32" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json(&json, &path.display().to_string())
    }

    pub fn from_hf_json(json: &Value, source_name: &str) -> Result<Self, ConfigError> {
        let f = Fields { json, source_name };
        let arch_name = match json.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => a[0].as_str().unwrap_or("").to_string(),
            _ => match json.get("model_type").and_then(Value::as_str) {
                Some("llama") => "LlamaForCausalLM".to_string(),
                Some("mistral") => "MistralForCausalLM".to_string(),
                Some("qwen2") => "Qwen2ForCausalLM".to_string(),
                Some(other) => other.to_string(),
                None => {
                    return Err(f.err(
                        "architectures",
                        "is missing (and so is `model_type`); this does not look like a \
                         transformers model config",
                    ))
                }
            },
        };
        let architecture =
            Architecture::from_hf(&arch_name).ok_or_else(|| ConfigError::Unsupported {
                source_name: source_name.to_string(),
                found: arch_name.clone(),
            })?;

        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        // transformers 5 writes the RoPE base and scaling inside `rope_parameters`; earlier
        // versions at the top level (which wins where a config has both).
        let rope_parameters = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_scaling = match (
            json.get("rope_scaling").filter(|v| !v.is_null()),
            rope_parameters,
        ) {
            (Some(s), _) => parse_rope_scaling(s, "rope_scaling", &f)?,
            (None, Some(p)) => parse_rope_scaling(p, "rope_parameters", &f)?,
            (None, None) => None,
        };
        let rope_theta = match (f.opt_f64("rope_theta")?, rope_parameters) {
            (Some(t), _) => t,
            (None, Some(p)) => match p.get("rope_theta") {
                None | Some(Value::Null) => 10_000.0,
                Some(v) => v
                    .as_f64()
                    .filter(|t| t.is_finite() && *t > 0.0)
                    .ok_or_else(|| {
                        f.err("rope_parameters.rope_theta", "is not a positive number")
                    })?,
            },
            (None, None) => 10_000.0,
        };
        let eos_token_ids = match json.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => vec![],
        };
        let sliding_window = match architecture {
            // Qwen2 configs carry a window but only use it with `use_sliding_window: true`.
            Architecture::Qwen2 if !f.opt_bool("use_sliding_window")?.unwrap_or(false) => None,
            _ => f.opt_usize("sliding_window")?,
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || f.opt_bool("attention_bias")?.unwrap_or(false),
            sliding_window,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
            eos_token_ids,
        };
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.err("mlp_bias", "is true; MLP biases are not supported"));
        }
        config.validate(source_name)?;
        Ok(config)
    }

    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let err = |field: &str, problem: String| ConfigError::Field {
            source_name: source_name.to_string(),
            field: field.to_string(),
            problem,
        };
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_DIM),
            ("num_key_value_heads", self.num_key_value_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ] {
            if v == 0 || v > max {
                return Err(err(name, format!("is {v}; it must be between 1 and {max}")));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "({}) must divide num_attention_heads ({})",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(err(
                "head_dim",
                format!("is {}; RoPE needs an even head size", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(err(
                "rms_norm_eps",
                format!("is {}; expected a small positive number", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(err(
                "rope_theta",
                format!("is {}; expected a number above 1", self.rope_theta),
            ));
        }
        if let Some(RopeScaling::Factors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 || f.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                return Err(err(
                    "rope_freqs",
                    format!("must hold {} positive factors", self.head_dim / 2),
                ));
            }
        }
        Ok(())
    }

    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// The RoPE scaling in `obj`, config.json's `scope`. Under `rope_parameters` (transformers 5),
/// which also holds the base, no `rope_type` is the default RoPE.
fn parse_rope_scaling(
    obj: &Value,
    scope: &str,
    f: &Fields,
) -> Result<Option<RopeScaling>, ConfigError> {
    let default = if scope == "rope_parameters" {
        "default"
    } else {
        ""
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or(default);
    let num = |key: &str| -> Result<f64, ConfigError> {
        obj.get(key)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                f.err(
                    &format!("{scope}.{key}"),
                    "is missing or not a positive number",
                )
            })
    };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        other => Err(f.err(
            &format!("{scope}.rope_type"),
            &format!("is `{other}`; supported RoPE scalings are llama3, linear and default"),
        )),
    }
}

/// Typed access to config.json fields with errors that name the field.
struct Fields<'a> {
    json: &'a Value,
    source_name: &'a str,
}

impl Fields<'_> {
    fn err(&self, field: &str, problem: &str) -> ConfigError {
        ConfigError::Field {
            source_name: self.source_name.to_string(),
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(key, &format!("is {v}; expected a non-negative integer"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "is missing; it is required for this architecture"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("is {v}; expected a number"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("is {v}; expected true or false"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama31() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": false, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009]
        })
    }

    #[test]
    fn reads_llama31_config() {
        let c = ModelConfig::from_hf_json(&llama31(), "config.json").unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
        assert!(!c.attention_bias);
    }

    #[test]
    fn reads_transformers_5_rope_parameters() {
        let mut j = llama31();
        let o = j.as_object_mut().unwrap();
        let mut params = o.remove("rope_scaling").unwrap();
        params["rope_theta"] = o.remove("rope_theta").unwrap();
        o.insert("rope_parameters".into(), params);
        let c = ModelConfig::from_hf_json(&j, "config.json").unwrap();
        let want = ModelConfig::from_hf_json(&llama31(), "config.json").unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            format!("{:?}", c.rope_scaling),
            format!("{:?}", want.rope_scaling)
        );
        // The default RoPE, its base only (no `rope_type` too).
        for params in [
            json!({"rope_theta": 100000.0, "rope_type": "default"}),
            json!({"rope_theta": 100000.0}),
        ] {
            j["rope_parameters"] = params;
            let c = ModelConfig::from_hf_json(&j, "config.json").unwrap();
            assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (100000.0, true));
        }
        j["rope_parameters"] = json!({"rope_theta": -1.0});
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_parameters.rope_theta"), "{e}");
        j["rope_parameters"] = json!({"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rope_parameters.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }

    #[test]
    fn qwen2_has_biases_and_no_window_by_default() {
        let mut j = llama31();
        j["architectures"] = json!(["Qwen2ForCausalLM"]);
        j["sliding_window"] = json!(4096);
        j["rope_scaling"] = Value::Null;
        let c = ModelConfig::from_hf_json(&j, "config.json").unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn unsupported_architecture_lists_supported_ones() {
        let mut j = llama31();
        j["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_hf_json(&j, "m/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPT2LMHeadModel")
                && e.contains("LlamaForCausalLM")
                && e.contains("Qwen2ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn absurd_and_missing_fields_are_named() {
        let mut j = llama31();
        j["num_key_value_heads"] = json!(7);
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut j = llama31();
        j["hidden_size"] = json!(1u64 << 40);
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
        // A context of no tokens: every length was cut to 0.
        let mut j = llama31();
        j["max_position_embeddings"] = json!(0);
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_position_embeddings") && e.contains("is 0"),
            "{e}"
        );
        let mut j = llama31();
        j.as_object_mut().unwrap().remove("vocab_size");
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size") && e.contains("missing"), "{e}");
        let mut j = llama31();
        j["hidden_size"] = json!("big");
        let e = ModelConfig::from_hf_json(&j, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }
}
