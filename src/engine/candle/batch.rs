//! Rows of token ids laid out as a micro-batch of candle tensors for the step: right-padded
//! ids, RoPE tables, the attention mask and the scored positions.

use super::step::MicroBatch;
use crate::data::batch::Row;
use crate::model::ops::{head, mask};
use crate::model::Llama;
use candle_core::{Result, Tensor};

/// Lays out rows as a right-padded micro-batch for `model`.
pub fn micro_batch(model: &Llama, rows: &[&Row]) -> Result<MicroBatch> {
    let dev = &model.device;
    let b = rows.len();
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let packed = rows.iter().any(|r| r.doc.last().copied().unwrap_or(0) > 0);
    let mut ids = vec![0u32; b * t];
    let mut target_rows = vec![];
    let mut target_ids = vec![];
    let mut target_weights = vec![];
    for (bi, r) in rows.iter().enumerate() {
        ids[bi * t..bi * t + r.len()].copy_from_slice(&r.ids);
        for p in head::scored(&r.trained, Some(&r.doc)) {
            target_rows.push((bi * t + p - 1) as u32);
            target_ids.push(r.ids[p]);
            target_weights.push(r.weight[p]);
        }
    }
    let n_targets = target_rows.len();
    let window = model.cfg.sliding_window;
    let (cos, sin, mask) = if packed {
        let mut positions = vec![0u32; b * t];
        for (bi, r) in rows.iter().enumerate() {
            positions[bi * t..bi * t + r.len()].copy_from_slice(&r.positions);
        }
        let docs: Vec<&[u32]> = rows.iter().map(|r| r.doc.as_slice()).collect();
        let (cos, sin) = model.rope.cos_sin(&positions, model.dtype)?;
        let half = model.cfg.head_dim / 2;
        (
            cos.reshape((b, t, half))?,
            sin.reshape((b, t, half))?,
            mask::batch(b, t, window, Some(&docs), dev)?,
        )
    } else {
        let (cos, sin) = model.rope.cos_sin_range(0, t, model.dtype)?;
        (cos, sin, mask::batch(b, t, window, None, dev)?)
    };
    Ok(MicroBatch {
        ids: Tensor::from_vec(ids, (b, t), dev)?,
        cos,
        sin,
        mask,
        target_rows: Tensor::from_vec(target_rows, n_targets, dev)?,
        target_ids: Tensor::from_vec(target_ids, n_targets, dev)?,
        target_weights: Tensor::from_vec(target_weights, n_targets, dev)?,
        n_targets,
        n_tokens: rows.iter().map(|r| r.len()).sum(),
        dropout: None,
        mlp_chunk_rows: None,
    })
}
