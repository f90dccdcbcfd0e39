//! The preference objectives (DPO, ORPO) on the MLX step, as the candle engine runs them: a
//! micro-batch holds pairs of rows (chosen, then rejected). DPO scores both answers with the
//! adapter off first (the reference). The step's forward runs with the adapter and each scored
//! token's cross-entropy is read back (one evaluation); the pair losses of
//! [`crate::engine::objective`] turn the answers' log-probabilities into one weight per answer,
//! which scales each of its tokens in the head's gradient, and the block-wise backward follows
//! as for SFT.

use super::batch::Layout;
use super::params::{Banks, Params};
use super::step::{self, Evaluation};
use super::weights::Model;
use crate::engine::objective::{
    per_sequence, weigh_pairs, Method, PreferenceLoss, PreferenceSums, SequenceScores,
};
use crate::error::Result;
use mlx_rs::Array;

/// Each sequence's log-probability and scored tokens under `params` (None: the adapter off),
/// without a graph.
fn score(model: &Model, params: Option<&Params>, lay: &Layout) -> Result<SequenceScores> {
    let lowered = params.map(|p| step::lowered(model, p)).transpose()?;
    let (x, _) = step::forward(model, lowered.as_ref(), lay, 0, Evaluation::standard())?;
    let ce = step::row_ce(model, &x, lay, Evaluation::standard())?;
    Ok(per_sequence(&host(&ce)?, &lay.target_rows, lay.t, lay.b))
}

fn host(a: &Array) -> Result<Vec<f64>> {
    a.eval()?;
    Ok(a.as_slice::<f32>().iter().map(|&v| v as f64).collect())
}

/// The sums of one micro-batch of pairs under `loss`, and its LoRA gradient (f32, laid out as
/// [`Params::banks`]), the top `keep` adapted blocks keeping their frozen products.
pub fn forward_backward(
    model: &Model,
    params: &Params,
    lay: &Layout,
    (loss, keep): (&PreferenceLoss, usize),
) -> Result<(PreferenceSums, Banks)> {
    let reference = match loss.method {
        Method::Dpo => Some(score(model, None, lay)?),
        _ => None,
    };
    let params = &step::lowered(model, params)?;
    let (x, inputs) = step::forward(model, Some(params), lay, keep, Evaluation::standard())?;
    let ce = step::row_ce(model, &x, lay, Evaluation::standard())?;
    let policy = per_sequence(&host(&ce)?, &lay.target_rows, lay.t, lay.b);
    let (sums, per_seq) = weigh_pairs(loss, &policy, reference.as_ref());
    let coef: Vec<f32> = lay
        .target_rows
        .iter()
        .map(|&r| per_seq[r as usize / lay.t] as f32)
        .collect();
    let (dx, _, _) = step::head_backward(model, &x, lay, &coef, Evaluation::standard())?;
    drop(x);
    Ok((
        sums,
        params.raised(&step::backward(
            model,
            params,
            lay,
            inputs,
            dx,
            Evaluation::standard(),
        )?)?,
    ))
}

/// Each row's scores with the adapter and, when `reference` (DPO), without it.
pub fn score_pairs(
    model: &Model,
    params: &Params,
    lay: &Layout,
    reference: bool,
) -> Result<(SequenceScores, Option<SequenceScores>)> {
    let policy = score(model, Some(params), lay)?;
    let reference = match reference {
        true => Some(score(model, None, lay)?),
        false => None,
    };
    Ok((policy, reference))
}
