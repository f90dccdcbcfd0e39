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
use crate::engine::objective::{
    evaluate_pairs, per_sequence, weigh_pairs, Method, PreferenceLoss, PreferenceSums,
    SequenceScores,
};
use crate::engine::StepError;
use crate::model::lora::Adapter;
use crate::model::ops::head::head_rows;
use crate::model::Llama;
use candle_core::{Result, Tensor};
use std::time::Instant;

/// Each sequence's log-probability and scored tokens under `adapter` (None: the base model),
/// without a graph.
fn score(model: &Llama, mb: &MicroBatch, adapter: Option<&Adapter>) -> Result<SequenceScores> {
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
            let (sums, per_seq) = weigh_pairs(loss, &policy, reference.as_ref());
            let coef: Vec<f32> = per_seq
                .iter()
                .flat_map(|&c| std::iter::repeat_n(c as f32, t))
                .collect();
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
    evaluate_pairs(pairs, batch_size, method, beta, |rows, reference| {
        let refs: Vec<&Row> = rows.iter().collect();
        let mb = micro_batch(model, &refs)?;
        let policy = score(model, &mb, model.adapter.as_ref())?;
        let reference = match reference {
            true => Some(score(model, &mb, None)?),
            false => None,
        };
        Ok((policy, reference))
    })
}
