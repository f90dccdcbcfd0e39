//! Loss and perplexity of a model over encoded samples, on exactly the tokens training scores,
//! through the same LM head and loss ([`crate::model::ops::head`]), which runs on chunks of
//! scored positions so the full `[tokens, vocab]` logits never exist at once.

use crate::data::Sample;
use crate::error::{Error, Result};
use crate::model::ops::head;
use crate::model::{KvCache, Llama};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy (nats) per scored token.
    pub loss: f64,
    pub tokens: usize,
    pub examples: usize,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Sum of cross-entropy over the trained tokens of `samples`, in batches right-padded to
/// their longest member (causal attention keeps padding from touching real positions).
pub fn evaluate(model: &Llama, samples: &[Sample], batch_size: usize) -> Result<EvalResult> {
    let mut total = 0f64;
    let mut tokens = 0usize;
    for batch in samples.chunks(batch_size.max(1)) {
        // A stop signal (during training) ends the evaluation between two batches.
        if let Some(signal) = crate::runtime::signals::requested() {
            return Err(Error::Stopping { signal });
        }
        let (sum, n) = batch_loss_sum(model, batch)?;
        total += sum;
        tokens += n;
    }
    Ok(EvalResult {
        loss: if tokens > 0 {
            total / tokens as f64
        } else {
            f64::NAN
        },
        tokens,
        examples: samples.len(),
    })
}

/// (sum of token cross-entropies, number of scored tokens) for one batch: the rows training
/// would score, through the same LM head and loss.
pub fn batch_loss_sum(model: &Llama, batch: &[Sample]) -> Result<(f64, usize)> {
    let t = batch.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    if t < 2 {
        return Ok((0.0, 0));
    }
    let mut ids = Vec::with_capacity(batch.len() * t);
    let mut rows = vec![];
    let mut targets = vec![];
    for (b, s) in batch.iter().enumerate() {
        ids.extend_from_slice(&s.ids);
        ids.extend(std::iter::repeat_n(0u32, t - s.ids.len()));
        for p in head::scored(&s.trained, None) {
            rows.push((b * t + p - 1) as u32);
            targets.push(s.ids[p]);
        }
    }
    if rows.is_empty() {
        return Ok((0.0, 0));
    }
    let n = rows.len();
    let dev = &model.device;
    let input = Tensor::from_vec(ids, (batch.len(), t), dev)?;
    let hidden = model.hidden_states(&input, &mut KvCache::new(model.blocks.len()))?;
    let targets = head::Targets {
        rows: &Tensor::from_vec(rows, n, dev)?,
        ids: &Tensor::from_vec(targets, n, dev)?,
        weights: &Tensor::ones(n, DType::F32, dev)?,
    };
    let (sums, _) = head::head(model, &hidden, &targets, None)?;
    Ok((sums.ce, n))
}
