//! Rotary position embeddings: the inverse frequencies (with Llama 3.1 / linear scaling) and the
//! cos/sin tables for a set of positions. The "rotate half" layout of Hugging Face checkpoints
//! is used throughout; GGUF weights are un-permuted at load to match it.

use super::config::{ModelConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};

/// Inverse frequencies, one per pair of head dimensions, after scaling.
pub fn inv_freqs(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let scaled: Vec<f64> = match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Factors(fs)) => base.iter().zip(fs).map(|(f, s)| f / *s as f64).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// cos/sin tables for one sequence of positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let f = inv_freqs(cfg);
        let n = f.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(f, (1, n), device)?,
        })
    }

    /// `(cos, sin)`, each `[positions.len(), head_dim / 2]`, in `dtype`.
    pub fn cos_sin(&self, positions: &[u32], dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv_freq.device())?;
        let angles = pos.broadcast_mul(&self.inv_freq)?;
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }

    /// Tables for the contiguous positions `start..start + len`.
    pub fn cos_sin_range(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let positions: Vec<u32> = (start..start + len).map(|p| p as u32).collect();
        self.cos_sin(&positions, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use serde_json::json;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let cfg = ModelConfig::from_hf_json(
            &json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 1, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 10, "rope_theta": 500000.0,
                "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}}),
            "t",
        )
        .unwrap();
        let mut plain = cfg.clone();
        plain.rope_scaling = None;
        let (s, p) = (inv_freqs(&cfg), inv_freqs(&plain));
        // Highest frequency: wavelength 2π < 2048, untouched.
        assert_eq!(s[0], p[0]);
        // Lowest frequency: wavelength far above 8192, divided by the factor.
        assert!((s[63] - p[63] / 8.0).abs() < 1e-12);
        // In between the result lies between the two.
        for i in 0..64 {
            assert!(s[i] <= p[i] && s[i] >= p[i] / 8.0 - 1e-12);
        }
    }
}
