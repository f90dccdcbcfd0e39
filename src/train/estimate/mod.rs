//! The pre-flight memory estimate: the peak resident memory of a training run, from the model's
//! shapes and the run's settings alone (no weights needed), term by term.
//!
//! It models each engine's step as written: the candle engine's in [`candle`], the MLX
//! engine's in [`mlx`]. When a step changes what it keeps alive, its model changes with it;
//! the estimate-vs-measured benchmark (`your_ai benchmark`) keeps the two honest. Here: the
//! workload and weight formats both share, and the figures both use (weights, LoRA, runtime).

pub mod candle;
pub mod mlx;

use crate::model::lora::Target;
use crate::model::quantized::QuantBits;
use crate::model::ModelConfig;

/// Memory that is not tensors: the binary, its libraries, thread stacks, the tokenizer and the
/// encoded data. Measured on SmolLM2 (49k-token vocabulary) as resident memory after loading
/// less the weights; the tokenizer's share grows with the vocabulary.
const RUNTIME_BYTES: u64 = 25_000_000;
const RUNTIME_BYTES_PER_VOCAB_ENTRY: u64 = 500;
/// Allocator slack on what the step allocates: heap fragmentation and freed pages not yet
/// returned (allocations above 4 MiB are mmapped and returned at once; see memory.rs).
pub(crate) const SLACK: f64 = 0.05;

/// Bytes per weight of `--quantize 4` (Q4_1: 32 weights share an f16 scale and an f16 offset:
/// 20 bytes).
pub const Q4_BYTES: f64 = 20.0 / 32.0;
/// Bytes per weight of 8-bit group quantization (32 weights and one f16 scale: 34 bytes).
pub const Q8_BYTES: f64 = 34.0 / 32.0;

/// How the frozen weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightFormat {
    /// Dense, this many bytes per weight (4 for f32, 2 for bf16/f16).
    Dense(f64),
    /// Bytes per weight (scales included: Q4_1, 4-bit with a 32-group f16 scale and offset,
    /// is 0.625) of the block linears, the token embeddings and the LM head (tied embeddings
    /// take the head's); norms dense at `other` bytes.
    Quantized {
        linear: f64,
        embed: f64,
        head: f64,
        other: f64,
    },
}

impl WeightFormat {
    /// The format `--quantize` gives (None: dense at the model's `dtype_bytes`).
    pub fn for_quantize(q: Option<QuantBits>, dtype_bytes: usize) -> Self {
        match q {
            None => WeightFormat::Dense(dtype_bytes as f64),
            Some(q) => Self::quantized(q, dtype_bytes as f64),
        }
    }

    /// `--quantize` as the loader applies it: linears and embeddings at `q`, the head at 8
    /// bits, norms at `other` bytes.
    pub fn quantized(q: QuantBits, other: f64) -> Self {
        let bytes = match q {
            QuantBits::Four => Q4_BYTES,
            QuantBits::Eight => Q8_BYTES,
        };
        WeightFormat::Quantized {
            linear: bytes,
            embed: bytes,
            head: Q8_BYTES,
            other,
        }
    }

    /// Bytes per weight of the dense parts (norms).
    pub fn dense_bytes(&self) -> f64 {
        match *self {
            WeightFormat::Dense(b) => b,
            WeightFormat::Quantized { other, .. } => other,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            WeightFormat::Dense(b) if *b >= 4.0 => "f32".into(),
            WeightFormat::Dense(_) => "bf16/f16".into(),
            WeightFormat::Quantized {
                linear,
                embed,
                head,
                ..
            } => {
                if embed == head && *head >= 2.0 {
                    // Dense vocabulary matrices (the MLX engine's layout).
                    format!("{:.1}-bit linears, dense vocab", linear * 8.0)
                } else if linear == embed {
                    format!(
                        "{:.1}-bit linears/embed, {:.1}-bit head",
                        linear * 8.0,
                        head * 8.0
                    )
                } else {
                    format!(
                        "{:.1}/{:.1}/{:.1}-bit linears/embed/head",
                        linear * 8.0,
                        embed * 8.0,
                        head * 8.0
                    )
                }
            }
        }
    }
}

/// What is being trained, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub batch_size: usize,
    pub seq_len: usize,
    pub lora_rank: usize,
    pub targets: Vec<Target>,
    /// Blocks carrying adapters (the last this many).
    pub adapted_layers: usize,
    /// Adapted blocks that keep their activations from the forward.
    pub keep_blocks: usize,
    pub dropout: bool,
    pub packed: bool,
    /// Bytes per activation element (4 on CPU, 2 with bf16 on GPUs).
    pub act_bytes: usize,
    pub weights: WeightFormat,
    /// Memory the load works in beside the weights it keeps: one read buffer and the slice or
    /// tensor being converted ([`crate::model::Inspected::load_work_bytes`]).
    pub load_work: u64,
    /// Which step runs, and so what it keeps alive.
    pub step: StepKind,
}

/// The step whose memory is modelled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepKind {
    /// The candle engine on the fused CPU kernels (f32 on the CPU), whose backward temporaries
    /// are fewer than candle's composite ops make (no `[B, heads, T, T]` copies besides the
    /// kept probabilities, one LM-head chunk).
    Kernels,
    /// The candle engine on candle's composite ops (Metal, half-precision activations, or the
    /// CPU with `YOUR_AI_NO_KERNELS`).
    Composite,
    /// The MLX engine ([`mlx`]); `host` is how the load holds the weights on the host before
    /// they are converted to MLX arrays (`Workload::weights` is how MLX holds them); `gpu`: on
    /// a GPU, where the measure is MLX's memory in the device, not the process's.
    Mlx { host: WeightFormat, gpu: bool },
}

impl StepKind {
    /// The candle engine's step for activations of `act_bytes` on `cpu`.
    pub fn candle(cpu: bool, act_bytes: usize) -> Self {
        if cpu && act_bytes == 4 && crate::kernels::enabled() {
            StepKind::Kernels
        } else {
            StepKind::Composite
        }
    }
}

/// One line of the estimate table.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The training peak, term by term (they add up to `train_peak`).
    pub terms: Vec<Term>,
    pub train_peak: u64,
    /// Peak while the model loads: the weights and the one piece being read and converted.
    pub load_peak: u64,
    /// The MLX engine's allocator cache counted in `train_peak`: the engine limits MLX's cache
    /// to it (0 for the candle engine).
    pub cache: u64,
}

impl Estimate {
    /// The run's peak resident memory: the larger of loading and training.
    pub fn peak(&self) -> u64 {
        self.train_peak.max(self.load_peak)
    }

    /// The table printed before training.
    pub fn table(&self, budget: Option<u64>) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        // As wide as the longest name, so the figures stay in one column.
        let w = self
            .terms
            .iter()
            .map(|t| t.name.chars().count())
            .fold(52, usize::max);
        let mut s = String::from("Memory estimate (peak resident memory):\n");
        for t in &self.terms {
            s.push_str(&format!("  {:<w$} {:>8.2} GB\n", t.name, gb(t.bytes)));
        }
        s.push_str(&format!(
            "  {:<w$} {:>8.2} GB\n",
            "training peak",
            gb(self.train_peak)
        ));
        s.push_str(&format!(
            "  {:<w$} {:>8.2} GB\n",
            "loading peak (weights + one tensor in flight)",
            gb(self.load_peak)
        ));
        if let Some(b) = budget {
            s.push_str(&format!(
                "  {:<w$} {:>8.2} GB ({:.0}% of the {:.2} GB budget)\n",
                "estimated peak",
                gb(self.peak()),
                100.0 * self.peak() as f64 / b.max(1) as f64,
                gb(b)
            ));
        }
        s
    }
}

/// Memory that is not tensors, for a model of `cfg`'s vocabulary.
pub(crate) fn runtime_bytes(cfg: &ModelConfig) -> u64 {
    RUNTIME_BYTES + RUNTIME_BYTES_PER_VOCAB_ENTRY * cfg.vocab_size as u64
}

/// Parameters of the frozen model: (linear-layer weights, everything else).
pub fn frozen_params(cfg: &ModelConfig) -> (u64, u64) {
    let linear: u64 = Target::ALL
        .iter()
        .map(|t| {
            let (i, o) = t.dims(cfg);
            (i * o) as u64
        })
        .sum::<u64>()
        * cfg.num_hidden_layers as u64;
    let embed = (cfg.vocab_size * cfg.hidden_size) as u64;
    let head = if cfg.tie_word_embeddings { 0 } else { embed };
    let norms = ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size) as u64;
    (linear, embed + head + norms)
}

/// Bytes of the frozen weights as held in memory.
pub fn frozen_bytes(cfg: &ModelConfig, format: WeightFormat) -> u64 {
    let (linear, other) = frozen_params(cfg);
    match format {
        WeightFormat::Dense(b) => ((linear + other) as f64 * b) as u64,
        WeightFormat::Quantized {
            linear: q,
            embed,
            head,
            other: o,
        } => {
            let norms = ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size) as f64;
            let matrices = vocab_matrix_bytes(cfg, embed, head);
            (linear as f64 * q + matrices + norms * o) as u64
        }
    }
}

/// Bytes of the embedding and head matrices (one when tied) at `embed` and `head` bytes a
/// weight.
pub(crate) fn vocab_matrix_bytes(cfg: &ModelConfig, embed: f64, head: f64) -> f64 {
    let n = (cfg.vocab_size * cfg.hidden_size) as f64;
    if cfg.tie_word_embeddings {
        n * head
    } else {
        n * (embed + head)
    }
}

/// Trainable LoRA parameters.
pub fn lora_params(cfg: &ModelConfig, w: &Workload) -> u64 {
    let per_block: usize = w
        .targets
        .iter()
        .map(|t| {
            let (i, o) = t.dims(cfg);
            w.lora_rank * (i + o)
        })
        .sum();
    (per_block * w.adapted_layers) as u64
}

/// The estimate for `w`'s step: the candle engine's ([`candle`]) or the MLX engine's ([`mlx`]).
pub fn estimate(cfg: &ModelConfig, w: &Workload) -> Estimate {
    match w.step {
        StepKind::Mlx { host, gpu } => mlx::estimate(cfg, w, host, gpu),
        _ => candle::estimate(cfg, w),
    }
}

/// The estimate's lines: the frozen weights, the LoRA state, the step's work, the runtime.
pub(crate) fn four_terms(
    weights_name: String,
    weights: u64,
    params: u64,
    lora_state: u64,
    work_name: String,
    work: u64,
    (runtime_name, runtime): (&str, u64),
) -> Vec<Term> {
    vec![
        Term {
            name: weights_name,
            bytes: weights,
        },
        Term {
            name: format!(
                "LoRA params + AdamW moments ({:.1}M params)",
                params as f64 / 1e6
            ),
            bytes: lora_state,
        },
        Term {
            name: work_name,
            bytes: work,
        },
        Term {
            name: runtime_name.into(),
            bytes: runtime,
        },
    ]
}

/// The largest of named figures.
pub(crate) fn largest<const N: usize>(xs: [(&'static str, u64); N]) -> (&'static str, u64) {
    xs.into_iter().max_by_key(|x| x.1).unwrap_or(("", 0))
}

/// Changes that would bring an over-budget run under `budget`, as command-line advice.
pub fn suggestions(
    cfg: &ModelConfig,
    w: &Workload,
    budget: u64,
    quantize_available: bool,
) -> Vec<String> {
    let fits = |x: &Workload| estimate(cfg, x).peak() <= budget;
    let mut out = vec![];
    if let Some(b) = (1..w.batch_size).rev().find(|&b| {
        fits(&Workload {
            batch_size: b,
            ..w.clone()
        })
    }) {
        out.push(format!("--batch-size {b}"));
    }
    // Sequence lengths in steps of 64 (the largest that fits), at least 64.
    if let Some(len) = (1..w.seq_len / 64).rev().map(|k| k * 64).find(|&len| {
        fits(&Workload {
            seq_len: len,
            ..w.clone()
        })
    }) {
        out.push(format!("--max-seq-length {len}"));
    }
    let mut r = w.lora_rank / 2;
    while r >= 1 {
        if fits(&Workload {
            lora_rank: r,
            ..w.clone()
        }) {
            out.push(format!("--lora-rank {r}"));
            break;
        }
        r /= 2;
    }
    if let Some(n) = (1..w.adapted_layers).rev().find(|&n| {
        fits(&Workload {
            adapted_layers: n,
            keep_blocks: w.keep_blocks.min(n),
            ..w.clone()
        })
    }) {
        out.push(format!("--num-layers {n}"));
    }
    if w.keep_blocks > 0
        && fits(&Workload {
            keep_blocks: 0,
            ..w.clone()
        })
    {
        out.push("--keep-activations none".into());
    }
    // MLX converts from the host's load, which `--quantize 4` makes quantized too: the
    // loading peak it is checked against shrinks with it.
    let host_q4 = |host: WeightFormat| WeightFormat::quantized(QuantBits::Four, host.dense_bytes());
    let q4 = Workload {
        weights: match w.step {
            StepKind::Mlx { .. } => mlx::weight_format(Some(QuantBits::Four), w.act_bytes),
            _ => WeightFormat::quantized(QuantBits::Four, w.weights.dense_bytes()),
        },
        step: match w.step {
            StepKind::Mlx { host, gpu } => StepKind::Mlx {
                host: host_q4(host),
                gpu,
            },
            step => step,
        },
        ..w.clone()
    };
    if quantize_available && !matches!(w.weights, WeightFormat::Quantized { .. }) && fits(&q4) {
        out.push("--quantize 4".into());
    }
    out
}

/// The largest batch size up to `max` whose estimate fits `budget`.
pub fn largest_batch(cfg: &ModelConfig, w: &Workload, max: usize, budget: u64) -> Option<usize> {
    (1..=max).rev().find(|&b| {
        estimate(
            cfg,
            &Workload {
                batch_size: b,
                ..w.clone()
            },
        )
        .peak()
            <= budget
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SmolLM2-135M's shape.
    pub(crate) fn smollm2() -> ModelConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true
        });
        ModelConfig::from_hf_json(&json, "test").unwrap()
    }

    pub(crate) fn workload() -> Workload {
        Workload {
            batch_size: 4,
            seq_len: 256,
            lora_rank: 8,
            targets: Target::ALL.to_vec(),
            adapted_layers: 30,
            keep_blocks: 0,
            dropout: false,
            packed: false,
            act_bytes: 4,
            weights: WeightFormat::Dense(4.0),
            load_work: 0,
            step: StepKind::Kernels,
        }
    }

    #[test]
    fn parameter_counts_match_the_model() {
        let cfg = smollm2();
        let (linear, other) = frozen_params(&cfg);
        // SmolLM2-135M: 134,515,008 parameters with tied embeddings.
        assert_eq!(linear + other, 134_515_008);
        let w = workload();
        // rank 8 on all seven linears: 8·(576+576 + 2·(576+192) + 576+576 + 3·(576+1536)) · 30
        assert_eq!(lora_params(&cfg, &w), 8 * (2304 + 1536 + 6336) * 30);
    }

    #[test]
    fn terms_add_up_and_grow_with_the_work() {
        let cfg = smollm2();
        let w = workload();
        let e = estimate(&cfg, &w);
        assert_eq!(e.terms.iter().map(|t| t.bytes).sum::<u64>(), e.train_peak);
        let bigger = |f: &dyn Fn(&mut Workload)| {
            let mut x = w.clone();
            f(&mut x);
            estimate(&cfg, &x).train_peak
        };
        assert!(bigger(&|x| x.batch_size = 8) > e.train_peak);
        assert!(bigger(&|x| x.seq_len = 512) > e.train_peak);
        assert!(bigger(&|x| x.lora_rank = 64) > e.train_peak);
        assert!(bigger(&|x| x.keep_blocks = 30) > e.train_peak);
        assert!(bigger(&|x| x.adapted_layers = 10) < e.train_peak);
        let q4 = bigger(&|x| x.weights = WeightFormat::quantized(QuantBits::Four, 4.0));
        assert!(q4 < e.train_peak);
        // The table: figures in one column however long a name, the budget as given.
        let mut long = e.clone();
        long.terms[0].name = "x".repeat(70);
        let table = long.table(Some(850_000_000));
        let at: Vec<usize> = table
            .lines()
            .skip(1)
            .filter_map(|l| l.find(" GB"))
            .collect();
        assert!(at.windows(2).all(|p| p[0] == p[1]), "{table}");
        assert!(table.contains("of the 0.85 GB budget"), "{table}");
    }

    /// On MLX a small run's peak is the host's dense load, which `--quantize 4` shrinks too:
    /// it was left out of the advice ("nothing smaller fits") though it fits.
    #[test]
    fn mlx_advice_counts_the_quantized_load() {
        let cfg = smollm2();
        let dense = WeightFormat::Dense(4.0);
        let w = Workload {
            batch_size: 1,
            seq_len: 128,
            step: StepKind::Mlx {
                host: dense,
                gpu: false,
            },
            ..workload()
        };
        let q4 = Workload {
            weights: mlx::weight_format(Some(QuantBits::Four), 4),
            step: StepKind::Mlx {
                host: WeightFormat::quantized(QuantBits::Four, 4.0),
                gpu: false,
            },
            ..w.clone()
        };
        let budget = estimate(&cfg, &q4).peak() + 1;
        assert!(estimate(&cfg, &w).peak() > budget);
        assert!(suggestions(&cfg, &w, budget, true).contains(&"--quantize 4".to_string()));
    }

    #[test]
    fn suggestions_fit_when_applied() {
        let cfg = smollm2();
        let w = Workload {
            batch_size: 8,
            seq_len: 1024,
            ..workload()
        };
        let peak = estimate(&cfg, &w).peak();
        let budget = peak * 7 / 10;
        let advice = suggestions(&cfg, &w, budget, true);
        assert!(!advice.is_empty());
        for a in &advice {
            let (flag, value) = a.split_once(' ').unwrap();
            let mut x = w.clone();
            match flag {
                "--batch-size" => x.batch_size = value.parse().unwrap(),
                "--max-seq-length" => x.seq_len = value.parse().unwrap(),
                "--lora-rank" => x.lora_rank = value.parse().unwrap(),
                "--num-layers" => x.adapted_layers = value.parse().unwrap(),
                "--quantize" => x.weights = WeightFormat::quantized(QuantBits::Four, 4.0),
                other => panic!("unexpected advice {other}"),
            }
            assert!(estimate(&cfg, &x).peak() <= budget, "{a} does not fit");
        }
        let b = largest_batch(&cfg, &w, 8, budget).unwrap();
        assert!(
            b < 8
                && estimate(
                    &cfg,
                    &Workload {
                        batch_size: b,
                        ..w.clone()
                    }
                )
                .peak()
                    <= budget
        );
        assert!(
            estimate(
                &cfg,
                &Workload {
                    batch_size: b + 1,
                    ..w
                }
            )
            .peak()
                > budget
        );
    }
}
