//! LoRA adapters: `W x + (α / r) · B A x` on chosen linear layers of chosen blocks, stored and
//! loaded in the PEFT layout (`adapter_model.safetensors` + `adapter_config.json`) so that
//! `peft.PeftModel.from_pretrained` loads what we write and we load what PEFT writes.

mod peft;

use crate::model::ModelConfig;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// The seven linear layers of a Llama block, in PEFT's module names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The targets whose linears read the same input, as ranges of [`Target::index`]: q, k
    /// and v; o; gate and up; down. (The MLX engine computes each range as one product.)
    pub const BY_INPUT: [std::ops::Range<usize>; 4] = [0..3, 3..4, 4..6, 6..7];

    pub fn index(self) -> usize {
        self as usize
    }

    /// `q_proj`, `gate_proj`, ...
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Path inside a block: `self_attn.q_proj`, `mlp.up_proj`, ...
    pub fn path(self) -> String {
        let parent = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.module())
    }

    /// Accepts `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Some(match s {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            _ => return None,
        })
    }

    /// `(in, out)` features of this layer.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        match self {
            Target::Q => (h, cfg.q_size()),
            Target::K | Target::V => (h, cfg.kv_size()),
            Target::O => (cfg.q_size(), h),
            Target::Gate | Target::Up => (h, cfg.intermediate_size),
            Target::Down => (cfg.intermediate_size, h),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The adapter a flag names is not there: a command-line mistake (exit 2).
    #[error(
        "adapter {} does not exist; give the directory with adapter_config.json and \
         adapter_model.safetensors (a training run's --output)",
        path.display()
    )]
    NoSuchDir { path: PathBuf },
    #[error("cannot {action} {}: {reason}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// Blocks that carry adapters, ascending.
    pub layers: Vec<usize>,
    /// rsLoRA scales by α/√r instead of α/r.
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// One adapter pair: `a` is `[r, in]`, `b` is `[out, r]`, both f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// All adapter pairs of a model, indexed `[block][target]`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub cfg: LoraConfig,
    pub pairs: Vec<[Option<LoraPair>; 7]>,
}

impl Adapter {
    /// PEFT's initialisation: A ~ U(−1/√in, 1/√in) (Kaiming-uniform with a = √5), B = 0, so
    /// the adapted model starts equal to the base.
    pub fn init(
        cfg: LoraConfig,
        model: &ModelConfig,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs: Vec<[Option<LoraPair>; 7]> = (0..model.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        for &l in &cfg.layers {
            for &t in &cfg.targets {
                let (inp, out) = t.dims(model);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                pairs[l][t.index()] = Some(LoraPair {
                    a: Tensor::from_vec(a, (cfg.rank, inp), device)?,
                    b: Tensor::zeros((out, cfg.rank), DType::F32, device)?,
                });
            }
        }
        Ok(Self { cfg, pairs })
    }

    pub fn get(&self, layer: usize, t: Target) -> Option<&LoraPair> {
        self.pairs.get(layer)?[t.index()].as_ref()
    }

    /// `(layer, target, pair)` for every pair, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.pairs.iter().enumerate().flat_map(|(l, ps)| {
            Target::ALL
                .iter()
                .filter_map(move |&t| ps[t.index()].as_ref().map(|p| (l, t, p)))
        })
    }

    /// Every parameter tensor, A then B per pair, in [`Adapter::iter`] order.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.pairs
            .iter_mut()
            .flatten()
            .flatten()
            .flat_map(|p| [&mut p.a, &mut p.b])
    }

    /// The same adapter with its tensors in `dtype` (tests use f64).
    pub fn to_dtype(&self, dtype: DType) -> candle_core::Result<Self> {
        let mut out = self.clone();
        for t in out.tensors_mut() {
            *t = t.to_dtype(dtype)?;
        }
        Ok(out)
    }

    /// The same adapter with its tensors on `device` (the host is `Device::Cpu`).
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        let mut out = self.clone();
        for t in out.tensors_mut() {
            *t = t.to_device(device)?;
        }
        Ok(out)
    }

    pub fn num_params(&self) -> usize {
        self.iter()
            .map(|(_, _, p)| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// PEFT tensor name for a pair's A or B matrix.
    pub fn tensor_name(layer: usize, t: Target, which: char) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.lora_{which}.weight",
            t.path()
        )
    }

    /// The PEFT name of the first tensor with a NaN or infinite value, if any.
    pub fn first_non_finite(&self) -> Option<String> {
        // 0·x is 0 for every finite x and NaN otherwise, and a sum keeps a NaN. In f32, which
        // every device has (Metal has no f64).
        let finite = |t: &Tensor| {
            t.affine(0.0, 0.0)
                .and_then(|d| d.to_dtype(DType::F32))
                .and_then(|d| d.sum_all())
                .and_then(|s| s.to_scalar::<f32>())
                .is_ok_and(|s| s == 0.0)
        };
        self.iter().find_map(|(l, t, p)| {
            if !finite(&p.a) {
                Some(Self::tensor_name(l, t, 'A'))
            } else if !finite(&p.b) {
                Some(Self::tensor_name(l, t, 'B'))
            } else {
                None
            }
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn tiny_cfg() -> ModelConfig {
        ModelConfig::from_hf_json(
            &json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10}),
            "t",
        )
        .unwrap()
    }

    /// Rank 2 on q and down of the last two blocks.
    pub(crate) fn tiny_lora() -> LoraConfig {
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::Down],
            layers: vec![1, 2],
            use_rslora: false,
        }
    }

    #[test]
    fn targets_parse_and_name() {
        assert_eq!(Target::parse("gate_proj"), Some(Target::Gate));
        assert_eq!(Target::parse("q"), Some(Target::Q));
        assert_eq!(Target::parse("lm_head"), None);
        assert_eq!(
            Adapter::tensor_name(3, Target::Up, 'B'),
            "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
        );
    }
}
