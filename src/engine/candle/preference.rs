//! The preference objectives (DPO, ORPO) on the candle step. A micro-batch holds pairs of rows
//! (chosen, then rejected). DPO first scores both answers with the adapter off (the
//! reference: the same weights, no graph, nothing kept); then the step's forward runs with the
//! adapter, the head gives each scored token's cross-entropy with its unit gradient, the pair
//! losses of [`crate::engine::objective`] turn the answers' log-probabilities into one weight
//! per answer, and the gradient is scaled by it before the usual block-wise backward. The
//! memory is the SFT step's on twice the rows, plus one forward's hidden states.

use super::batch::micro_batch;
use super::step::{hidden, Grads, MicroBatch, Profile, Step};
use crate::data::batch::Row;
use crate::data::preference::Pair;
use crate::engine::objective::{pair_terms, Method, PairLogps, PreferenceLoss, PreferenceSums};
use crate::engine::StepError;
use crate::model::lora::Adapter;
use crate::model::ops::head::head_rows;
use crate::model::Llama;
use candle_core::{Result, Tensor};
use std::time::Instant;

/// Each sequence's log-probability (−Σ CE over its scored tokens) and scored-token count, from
/// the cross-entropy of each scored row of a `[seqs, t]` batch.
fn per_sequence(ce: &[f64], rows: &[u32], t: usize, seqs: usize) -> (Vec<f64>, Vec<usize>) {
    let mut logp = vec![0.0; seqs];
    let mut tokens = vec![0; seqs];
    for (&c, &row) in ce.iter().zip(rows) {
        let s = row as usize / t;
        logp[s] -= c;
        tokens[s] += 1;
    }
    (logp, tokens)
}

/// Each sequence's log-probability and scored tokens under `adapter` (None: the base model),
/// without a graph.
fn score(
    model: &Llama,
    mb: &MicroBatch,
    adapter: Option<&Adapter>,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let (seqs, t) = mb.ids.dims2()?;
    let x = hidden(model, mb, adapter)?;
    let (ce, _) = head_rows(model, &x, &mb.targets(), None)?;
    Ok(per_sequence(
        &ce,
        &mb.target_rows.to_vec1::<u32>()?,
        t,
        seqs,
    ))
}

/// The pairs of a micro-batch as [`PairLogps`] (the reference's when given).
fn pairs_of(
    policy: &(Vec<f64>, Vec<usize>),
    reference: Option<&(Vec<f64>, Vec<usize>)>,
) -> Vec<PairLogps> {
    let (logp, tokens) = policy;
    (0..logp.len() / 2)
        .map(|i| {
            let (c, r) = (2 * i, 2 * i + 1);
            PairLogps {
                chosen: logp[c],
                rejected: logp[r],
                ref_chosen: reference.map_or(0.0, |x| x.0[c]),
                ref_rejected: reference.map_or(0.0, |x| x.0[r]),
                chosen_tokens: tokens[c],
                rejected_tokens: tokens[r],
            }
        })
        .collect()
}

/// Forward and backward of one micro-batch of pairs under `loss`, adding its gradients into
/// `grads`; returns the pairs' sums.
pub fn accumulate(
    step: &Step,
    mb: &MicroBatch,
    loss: &PreferenceLoss,
    grads: &mut Grads,
    profile: &mut Profile,
) -> std::result::Result<PreferenceSums, StepError> {
    let model = step.model;
    let (seqs, t) = mb.ids.dims2()?;
    let clock = Instant::now();
    let reference = match loss.method {
        Method::Dpo => Some(score(model, mb, None)?),
        _ => None,
    };
    profile.forward += clock.elapsed();
    let rows = mb.target_rows.to_vec1::<u32>()?;
    let targets = mb.targets();
    step.forward_backward_with(
        mb,
        |x| {
            // Unit weights: each row's gradient is that of its own CE, scaled below.
            let (ce, dx) = head_rows(model, x, &targets, Some(1.0))?;
            let dx = dx.expect("the gradient was asked for");
            let policy = per_sequence(&ce, &rows, t, seqs);
            let mut sums = PreferenceSums::default();
            let mut coef = vec![0f32; seqs * t];
            for (i, p) in pairs_of(&policy, reference.as_ref()).iter().enumerate() {
                let terms = pair_terms(loss.method, loss.beta, p);
                sums.add_pair(p, &terms);
                // log π = −Σ CE, so ∂loss/∂CE = −∂loss/∂log π for each of the answer's tokens.
                let mut chosen = -terms.d_chosen * loss.pair_scale;
                if loss.method == Method::Orpo {
                    chosen += loss.token_scale;
                }
                let rejected = -terms.d_rejected * loss.pair_scale;
                coef[2 * i * t..(2 * i + 1) * t].fill(chosen as f32);
                coef[(2 * i + 1) * t..(2 * i + 2) * t].fill(rejected as f32);
            }
            let coef = Tensor::from_vec(coef, (seqs * t, 1), x.device())?.to_dtype(dx.dtype())?;
            Ok((sums, dx.broadcast_mul(&coef)?))
        },
        grads,
        profile,
    )
}

/// The preference sums of `pairs` under `method` for `model` with its adapter (the reference
/// is the same model with the adapter off), in micro-batches of `batch_size` pairs.
pub fn evaluate(
    model: &Llama,
    pairs: &[Pair],
    batch_size: usize,
    method: Method,
    beta: f64,
) -> crate::error::Result<PreferenceSums> {
    let mut sums = PreferenceSums::default();
    for batch in pairs.chunks(batch_size.max(1)) {
        if let Some(signal) = crate::runtime::signals::requested() {
            return Err(crate::error::Error::Stopping { signal });
        }
        let rows = pair_rows(batch);
        let refs: Vec<&Row> = rows.iter().collect();
        let mb = micro_batch(model, &refs)?;
        let policy = score(model, &mb, model.adapter.as_ref())?;
        let reference = match method {
            Method::Dpo => Some(score(model, &mb, None)?),
            _ => None,
        };
        for p in pairs_of(&policy, reference.as_ref()) {
            sums.add_pair(&p, &pair_terms(method, beta, &p));
        }
    }
    Ok(sums)
}

/// The rows of pairs: chosen then rejected, pair after pair.
pub fn pair_rows(pairs: &[Pair]) -> Vec<Row> {
    pairs
        .iter()
        .flat_map(|p| [Row::single(&p.chosen, 1.0), Row::single(&p.rejected, 1.0)])
        .collect()
}
