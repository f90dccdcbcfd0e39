//! The base model opened for merging, and its weights with `W + scale · B A` added, one tensor at
//! a time in f32 (Hugging Face names and layout: a GGUF base's q/k rows are un-permuted on read).

use crate::error::{Error, Result};
use crate::model::lora::{Adapter, Target};
use crate::model::source::{self, ModelSource};
use crate::model::ModelConfig;
use crate::weights::{GgufFile, SafetensorsDir, WeightStore};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

pub struct Base {
    pub spec: String,
    pub source: ModelSource,
    pub cfg: ModelConfig,
    pub store: WeightStore,
    /// GGML types of a GGUF base's 2-D weights that are quantized (empty when dense).
    pub quantized_types: Vec<String>,
}

impl Base {
    pub fn open(spec: &str) -> Result<Self> {
        let source = source::resolve(spec)?;
        let (cfg, store) = match &source {
            ModelSource::HfDir(dir) => (
                ModelConfig::from_hf_file(&dir.join("config.json"))?,
                WeightStore::Safetensors(SafetensorsDir::open(dir)?),
            ),
            ModelSource::Gguf(path) => {
                let g = GgufFile::open(path)?;
                (g.config()?, WeightStore::Gguf(g))
            }
        };
        let mut quantized_types: Vec<String> = match &store {
            WeightStore::Gguf(g) => g
                .content
                .tensor_infos
                .values()
                .filter(|i| {
                    !matches!(
                        i.ggml_dtype,
                        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                    )
                })
                .map(|i| format!("{:?}", i.ggml_dtype))
                .collect(),
            WeightStore::Safetensors(_) => vec![],
        };
        quantized_types.sort();
        quantized_types.dedup();
        Ok(Self {
            spec: spec.to_string(),
            source,
            cfg,
            store,
            quantized_types,
        })
    }

    /// Every tensor of the model, Hugging Face name and shape, in checkpoint order.
    pub fn tensor_plan(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let mut plan = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        )];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            plan.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for t in Target::ALL {
                let (inp, out) = t.dims(c);
                plan.push((format!("{p}.{}.weight", t.path()), vec![out, inp]));
                if c.attention_bias && matches!(t, Target::Q | Target::K | Target::V) {
                    plan.push((format!("{p}.{}.bias", t.path()), vec![out]));
                }
            }
            plan.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        plan.push(("model.norm.weight".to_string(), vec![h]));
        if self.has_lm_head() {
            plan.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
        }
        plan
    }

    /// Whether the output head is stored separately (untied, or tied but stored anyway).
    pub fn has_lm_head(&self) -> bool {
        !self.cfg.tie_word_embeddings || self.store.contains("lm_head.weight")
    }

    /// The tensor `name` in f32 with the adapter's update merged in, when it has one.
    pub fn merged(&self, adapter: &Adapter, name: &str, shape: &[usize]) -> Result<Tensor> {
        // A stop signal (`fuse`) ends the merge here, between tensors.
        if let Some(signal) = crate::runtime::signals::requested() {
            return Err(Error::Stopping { signal });
        }
        let w = self.store.get(name, shape, DType::F32, &Device::Cpu)?;
        match adapter_target(name) {
            Some((layer, t)) => match adapter.get(layer, t) {
                Some(p) => {
                    let what = format!("merging the adapter into {name}");
                    let merged = merge_pair(&w, &p.a, &p.b, adapter.cfg.scale())
                        .map_err(|e| super::tensor_err(&what, e))?;
                    // Finite factors can still overflow (a huge `lora_alpha`): never written. The
                    // sum of magnitudes overflows too where values are astronomically large.
                    let magnitude = merged
                        .abs()
                        .and_then(|m| m.sum_all())
                        .and_then(|m| m.to_scalar::<f32>())
                        .map_err(|e| super::tensor_err(&what, e))?;
                    if !magnitude.is_finite() {
                        return Err(Error::Usage(format!(
                            "{what}: the result overflows (infinite, NaN or astronomical \
                             values; the adapter's scale, lora_alpha / r, is {}); check its \
                             adapter_config.json",
                            adapter.cfg.scale()
                        )));
                    }
                    Ok(merged)
                }
                None => Ok(w),
            },
            None => Ok(w),
        }
    }

    /// Refuses to merge into a quantized base unless the user chose to dequantize it.
    pub fn check_dequantize(&self, dequantize: bool) -> Result<()> {
        if self.quantized_types.is_empty() || dequantize {
            return Ok(());
        }
        Err(Error::Usage(format!(
            "--model {}: the base is quantized ({}). A LoRA update cannot be added to quantized \
             blocks without dequantizing them, so the merged weights are the dequantized base \
             plus the adapter, written in the output type you choose. Pass --dequantize to \
             accept that, or fuse onto an unquantized (F16/BF16/F32) copy of the base",
            self.spec,
            self.quantized_types.join(", ")
        )))
    }
}

/// `W + scale · B A`, in f32.
pub fn merge_pair(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let delta = b
        .to_dtype(DType::F32)?
        .matmul(&a.to_dtype(DType::F32)?)?
        .affine(scale, 0.0)?;
    w.to_dtype(DType::F32)? + delta
}

/// `model.layers.3.self_attn.q_proj.weight` → (3, Q); `None` for tensors without adapters.
pub fn adapter_target(name: &str) -> Option<(usize, Target)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?;
    let t = Target::ALL.into_iter().find(|t| t.path() == module)?;
    Some((layer.parse().ok()?, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_targets() {
        assert_eq!(
            adapter_target("model.layers.12.mlp.down_proj.weight"),
            Some((12, Target::Down))
        );
        assert_eq!(
            adapter_target("model.layers.0.self_attn.k_proj.weight"),
            Some((0, Target::K))
        );
        assert_eq!(adapter_target("model.layers.0.self_attn.k_proj.bias"), None);
        assert_eq!(
            adapter_target("model.layers.0.input_layernorm.weight"),
            None
        );
        assert_eq!(adapter_target("lm_head.weight"), None);
    }

    #[test]
    fn merge_adds_scaled_product() {
        let d = &Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], d).unwrap();
        let a = Tensor::new(&[[1f32, 0., 2.]], d).unwrap(); // [r=1, in=3]
        let b = Tensor::new(&[[0.5f32], [-1.]], d).unwrap(); // [out=2, r=1]
        let m = merge_pair(&w, &a, &b, 2.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Independent arithmetic: W[i][j] + 2 · b[i] · a[j].
        assert_eq!(m, vec![vec![2., 2., 5.], vec![2., 5., 2.]]);
    }
}
