//! Token-by-token generation with a KV cache: greedy or temperature / top-p sampling, stopping
//! at any of the model's end tokens.

use super::shape::{Guide, Shape};
use crate::data::tokenizer::{StreamDecoder, Tokenizer};
use crate::error::Result;
use crate::model::{KvCache, Llama};
use candle_core::{DType, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// How to sample a reply.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, allow_hyphen_values = true)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub top_p: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42, allow_hyphen_values = true)]
    pub seed: u64,
    /// Keep generating past the model's end tokens, up to --max-tokens (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub kv: KvCacheArgs,
}

/// `--kv-cache`: how the KV cache holds keys and values.
#[derive(Debug, Clone, Copy, Args)]
pub struct KvCacheArgs {
    /// How the KV cache holds keys and values on the CPU: f32 (the values as computed) or
    /// f16 (as llama.cpp: half the memory, and faster attention over long contexts: an 8B
    /// model's at 8192 tokens takes 0.6x the time; slightly slower on short ones).
    #[arg(long, value_enum, default_value_t = KvCacheType::F32)]
    pub kv_cache: KvCacheType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCacheType {
    F16,
    F32,
}

impl KvCacheType {
    /// The dtype `model`'s cache holds keys and values in (`None`: as computed). f16 applies
    /// to f32 arithmetic on the CPU; elsewhere the activations are already in half precision,
    /// or the attention would widen the whole cache for each token.
    fn store(self, model: &Llama) -> Option<DType> {
        let f32_on_cpu = model.device.is_cpu() && model.dtype == DType::F32;
        (self == KvCacheType::F16 && f32_on_cpu).then_some(DType::F16)
    }
}

impl SamplingArgs {
    /// The sampling settings, checked.
    pub fn sampling(&self) -> crate::Result<Sampling> {
        use crate::error::Error;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Usage(format!(
                "--top-p {} is outside (0, 1]",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(Error::Usage(
                "--max-tokens 0: there would be nothing to generate; give at least 1".into(),
            ));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Usage(format!(
                "--temperature {} must be 0 (greedy) or positive",
                self.temperature
            )));
        }
        Ok(Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            max_tokens: self.max_tokens,
            ignore_eos: self.ignore_eos,
            kv_cache: self.kv.kv_cache,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub max_tokens: usize,
    /// Generate past end tokens (benchmarks).
    pub ignore_eos: bool,
    pub kv_cache: KvCacheType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    EndToken(u32),
    MaxTokens,
    /// The caller's `on_text` asked to stop (a stop string, a client gone).
    Stopped,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generated {
    /// Generated tokens per second, prompt processing excluded.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let secs = self.decode_time.as_secs_f64();
        if secs > 0.0 {
            self.ids.len() as f64 / secs
        } else {
            0.0
        }
    }
}

/// Generates after `prompt`, calling `on_text` with each completed piece of text; it returns
/// `Break` to stop there.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    sampling: &Sampling,
    on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generated> {
    generate_with(
        model,
        tokenizer,
        (prompt, &Shape::Free),
        sampling,
        || ControlFlow::Continue(()),
        on_text,
    )
}

/// Bytes of attention scores one piece of the prompt may take (they grow with the piece's
/// rows times the context so far, per head): what bounds prompt processing's memory.
const PREFILL_SCORE_BYTES: usize = 256 << 20;

/// Prompt tokens processed in one forward: as many as keep the attention scores (three f32
/// copies: scores, masked, softmax) within [`PREFILL_SCORE_BYTES`] at context `context`,
/// from 16 to 512. A long prompt is processed piece by piece, so its memory stays bounded
/// (a whole 8k prompt took 8 GB for SmolLM2).
fn prefill_rows(model: &Llama, context: usize) -> usize {
    let per_row = 3 * 4 * model.cfg.num_attention_heads * context.max(1);
    (PREFILL_SCORE_BYTES / per_row.max(1)).clamp(16, 512)
}

/// [`generate`], with `between_pieces` asked before each piece of the prompt after the first:
/// `Break` stops there (a client gone during a long prompt), with nothing generated; and with
/// the reply's `shape`: each token is sampled among those that keep to it.
pub fn generate_with(
    model: &Llama,
    tokenizer: &Tokenizer,
    (prompt, shape): (&[u32], &Shape),
    sampling: &Sampling,
    between_pieces: impl FnMut() -> ControlFlow<()>,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generated> {
    if prompt.is_empty() {
        return Err(crate::error::Error::Usage(
            "an empty prompt: there is nothing to continue from".into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
    let mut cache =
        KvCache::for_decoding(model.blocks.len()).holding(sampling.kv_cache.store(model));
    let mut decoder = StreamDecoder::new();
    let mut ids = vec![];
    let mut text = String::new();
    let mut guide = Guide::new(shape, tokenizer);
    let start = Instant::now();
    let rows = prefill_rows(model, prompt.len());
    let Some(mut logits) = prefill(model, prompt, &mut cache, rows, between_pieces)? else {
        return Ok(Generated {
            ids,
            text,
            stop: StopReason::Stopped,
            prompt_tokens: prompt.len(),
            prefill_time: start.elapsed(),
            decode_time: Duration::ZERO,
        });
    };
    let prefill_time = start.elapsed();
    let decode_start = Instant::now();
    let mut stop = StopReason::MaxTokens;
    for _ in 0..sampling.max_tokens {
        // All-NaN scores would "sample" token 0 for ever: a reply of nothing, with exit 0.
        if logits.iter().any(|l| !l.is_finite()) {
            return Err(crate::error::Error::NotFinite(
                "the model's next-token scores are NaN or infinite with these weights (a \
                 damaged or diverged adapter, or a damaged model); nothing can be generated"
                    .into(),
            ));
        }
        let next = match guide.allowed(&ids) {
            Some(allowed) if allowed.is_empty() => {
                return Err(crate::error::Error::Generation(
                    "no token of this model's vocabulary can go on with the reply in the shape \
                     asked for (a schema that cannot be met within the nesting allowed?)"
                        .into(),
                ))
            }
            Some(allowed) => {
                let mut only = vec![f32::NEG_INFINITY; logits.len()];
                for t in allowed {
                    if let Some(l) = logits.get(t as usize) {
                        only[t as usize] = *l;
                    }
                }
                sample(&only, sampling, &mut rng)
            }
            None => sample(&logits, sampling, &mut rng),
        };
        guide.advance(next);
        if tokenizer.is_end(next) && !sampling.ignore_eos {
            stop = StopReason::EndToken(next);
            break;
        }
        ids.push(next);
        if let Some(piece) = decoder.push(tokenizer, next)? {
            text.push_str(&piece);
            if on_text(&piece).is_break() {
                stop = StopReason::Stopped;
                break;
            }
        }
        logits = match model.decode_next(next, &mut cache)? {
            Some(l) => l,
            None => {
                let input = Tensor::new(&[next], &model.device)?.unsqueeze(0)?;
                last_logits(model, &input, &mut cache)?
            }
        };
    }
    // Bytes held back for a character the reply ended inside: given as they decode (U+FFFD),
    // so the text is the decoding of the tokens counted.
    if stop != StopReason::Stopped {
        if let Some(piece) = decoder.finish(tokenizer)? {
            text.push_str(&piece);
            let _ = on_text(&piece);
        }
    }
    Ok(Generated {
        ids,
        text,
        stop,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: decode_start.elapsed(),
    })
}

/// Runs `prompt` into `cache`, `rows` tokens per forward, and returns the logits after its
/// last token; None when `between_pieces` (asked before each piece after the first) stops it.
pub fn prefill(
    model: &Llama,
    prompt: &[u32],
    cache: &mut KvCache,
    rows: usize,
    mut between_pieces: impl FnMut() -> ControlFlow<()>,
) -> Result<Option<Vec<f32>>> {
    let pieces = prompt.len().div_ceil(rows.max(1));
    for (i, piece) in prompt.chunks(rows.max(1)).enumerate() {
        if i > 0 && between_pieces().is_break() {
            return Ok(None);
        }
        let input = Tensor::new(piece, &model.device)?.unsqueeze(0)?;
        if i + 1 == pieces {
            return last_logits(model, &input, cache).map(Some);
        }
        model.forward_hidden(&input, cache)?;
    }
    Err(crate::error::Error::Usage(
        "an empty prompt: there is nothing to continue from".into(),
    ))
}

fn last_logits(model: &Llama, input: &Tensor, cache: &mut KvCache) -> Result<Vec<f32>> {
    let hidden = model.forward_hidden(input, cache)?;
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?;
    Ok(model
        .decode_logits(&last)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

/// Greedy when temperature is 0; otherwise nucleus sampling over the tempered softmax.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, (((l - max) as f64) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= s.top_p {
            cut = n + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for (i, p) in &probs {
        r -= p;
        if r <= 0.0 {
            return *i as u32;
        }
    }
    probs.last().map(|p| p.0 as u32).unwrap_or_else(argmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_p() {
        let logits = [0.0, 5.0, 1.0, 4.9];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 1,
            ignore_eos: false,
            kv_cache: KvCacheType::F16,
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        // top_p small keeps only the most likely token.
        let narrow = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            ..greedy.clone()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &narrow, &mut rng), 1);
        }
        // Full sampling reaches the runner-up too.
        let wide = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            ..greedy
        };
        let seen: std::collections::BTreeSet<u32> =
            (0..200).map(|_| sample(&logits, &wide, &mut rng)).collect();
        assert!(seen.contains(&1) && seen.contains(&3));
    }
}
