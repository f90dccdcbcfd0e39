//! Loss and perplexity of a model over encoded samples, on exactly the tokens training scores.
//! The LM head runs on chunks of scored positions so the full `[tokens, vocab]` logits never
//! exist at once.

use crate::data::Sample;
use crate::error::Result;
use crate::model::{KvCache, Llama};
use candle_core::{DType, Tensor, D};

/// Scored positions per LM-head chunk.
const HEAD_CHUNK: usize = 512;

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

/// (sum of token cross-entropies, number of scored tokens) for one batch.
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
        for p in 0..s.ids.len() - 1 {
            if s.trained[p + 1] {
                rows.push((b * t + p) as u32);
                targets.push(s.ids[p + 1]);
            }
        }
    }
    if rows.is_empty() {
        return Ok((0.0, 0));
    }
    let input = Tensor::from_vec(ids, (batch.len(), t), &model.device)?;
    let hidden = model.forward_hidden(&input, &mut KvCache::new(model.blocks.len()))?;
    let hidden = hidden.reshape((batch.len() * t, model.cfg.hidden_size))?;
    let mut sum = 0f64;
    for (r, tg) in rows.chunks(HEAD_CHUNK).zip(targets.chunks(HEAD_CHUNK)) {
        let idx = Tensor::new(r, &model.device)?;
        let h = hidden.index_select(&idx, 0)?;
        let logits = model.logits(&h)?;
        let logp = crate::model::llama::log_softmax_last(&logits)?;
        let tg = Tensor::new(tg, &model.device)?.unsqueeze(1)?;
        let picked = logp.gather(&tg, D::Minus1)?.to_dtype(DType::F64)?;
        sum -= picked.sum_all()?.to_scalar::<f64>()?;
    }
    Ok((sum, rows.len()))
}
