//! Rows of token ids laid out as a micro-batch of candle tensors for the step: right-padded
//! ids, RoPE tables, the attention mask and the scored positions.

use super::step::MicroBatch;
use crate::data::batch::Row;
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
        for p in 1..r.len() {
            if r.trained[p] && r.doc[p] == r.doc[p - 1] {
                target_rows.push((bi * t + p - 1) as u32);
                target_ids.push(r.ids[p]);
                target_weights.push(r.weight[p]);
            }
        }
    }
    let n_targets = target_rows.len();
    let (cos, sin, mask) = if packed {
        let mut positions = vec![0u32; b * t];
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (bi, r) in rows.iter().enumerate() {
            positions[bi * t..bi * t + r.len()].copy_from_slice(&r.positions);
            for i in 0..t {
                for j in 0..=i {
                    // Same document (padding counts as its own), causal.
                    let di = r.doc.get(i).copied().unwrap_or(u32::MAX);
                    let dj = r.doc.get(j).copied().unwrap_or(u32::MAX);
                    if di == dj || i == j {
                        mask[(bi * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        let (cos, sin) = model.rope.cos_sin(&positions, model.dtype)?;
        let half = model.cfg.head_dim / 2;
        (
            cos.reshape((b, t, half))?,
            sin.reshape((b, t, half))?,
            Tensor::from_vec(mask, (b, 1, 1, t, t), dev)?,
        )
    } else {
        let (cos, sin) = model.rope.cos_sin_range(0, t, model.dtype)?;
        let mask = crate::model::llama::causal_mask(t, 0, model.cfg.sliding_window, dev)?
            .unwrap_or(Tensor::zeros((t, t), candle_core::DType::F32, dev)?);
        (cos, sin, mask.reshape((1, 1, 1, t, t))?)
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
