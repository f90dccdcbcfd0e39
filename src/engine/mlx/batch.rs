//! Rows of token ids laid out for the MLX step: right-padded ids, the scored positions, and the
//! attention mask. Lengths are rounded up to a few buckets, so a run sees a handful of shapes
//! (MLX's allocator, and any compiled trace, is reused per shape) instead of one per length.
//! Right padding never changes a real position's result: attention is causal, so no real token
//! sees a pad. Packed rows (`--pack`) carry a per-row mask that keeps each document to itself,
//! and RoPE tables for positions that restart with each document.

use super::convert::indices;
use crate::data::batch::{bucket, Row};
use crate::error::Result;
use crate::model::ops::mask;
use crate::model::ModelConfig;
use mlx_rs::Array;

/// One micro-batch, laid out.
pub struct Layout {
    pub b: usize,
    /// The bucketed length.
    pub t: usize,
    /// `[B·T]` token ids.
    pub ids: Array,
    /// Rows of the flattened `[B·T]` positions whose next token is scored, ascending.
    pub target_rows: Vec<u32>,
    pub target_ids: Vec<u32>,
    /// Loss weight of each scored row.
    pub target_weights: Vec<f32>,
    /// An additive mask where causal alone is not the rule: `[T, T]` for a sliding window,
    /// `[B, 1, T, T]` for packed rows (each document sees only itself). None: causal.
    pub mask: Option<Array>,
    /// RoPE's `(cos, sin)` per position, `[B, 1, T, d/2]` in f32, for packed rows (positions
    /// restart with each document); None: positions `0..T`.
    pub rope: Option<(Array, Array)>,
    /// LoRA dropout `(probability, seed)` for this micro-batch (training only).
    pub dropout: Option<(f64, u64)>,
}

/// What a block needs of a micro-batch's layout: its shape, masks and RoPE tables, and LoRA
/// dropout. A view, so that a compiled block can be given its own arrays in their place.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub b: usize,
    pub t: usize,
    pub mask: Option<&'a Array>,
    pub rope: Option<(&'a Array, &'a Array)>,
    pub dropout: Option<(f64, u64)>,
}

impl Layout {
    pub fn rows(&self) -> Rows<'_> {
        Rows {
            b: self.b,
            t: self.t,
            mask: self.mask.as_ref(),
            rope: self.rope.as_ref().map(|(c, s)| (c, s)),
            dropout: self.dropout,
        }
    }
}

/// Lays out `rows` for a model of config `cfg`.
pub fn layout(rows: &[Row], cfg: &ModelConfig) -> Result<Layout> {
    let window = cfg.sliding_window;
    let packed = rows.iter().any(|r| r.doc.last().copied().unwrap_or(0) > 0);
    let b = rows.len();
    let t = bucket(rows.iter().map(Row::len).max().unwrap_or(1));
    let mut ids = vec![0u32; b * t];
    let (mut target_rows, mut target_ids, mut target_weights) = (vec![], vec![], vec![]);
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
    let (ti, bi) = (t as i32, b as i32);
    let (mask, rope) = if packed {
        // Pads form a document of their own (never scored), so no row is all −∞.
        let mut m = Vec::with_capacity(b * t * t);
        for r in rows {
            m.extend(mask::values(t, 0, window, |i| {
                r.doc.get(i).copied().unwrap_or(u32::MAX)
            }));
        }
        (
            Some(Array::from_slice(&m, &[bi, 1, ti, ti])),
            Some(rope_tables(rows, t, cfg)),
        )
    } else {
        let m = window.map(|_| Array::from_slice(&mask::values(t, 0, window, |_| 0), &[ti, ti]));
        (m, None)
    };
    Ok(Layout {
        b,
        t,
        ids: indices(&ids, &[(b * t) as i32]),
        target_rows,
        target_ids,
        target_weights,
        mask,
        rope,
        dropout: None,
    })
}

/// `(cos, sin)` of each row's own positions (pads at 0), `[B, 1, T, d/2]`: the angles as the
/// candle engine's tables make them (position × inverse frequency, in f32).
fn rope_tables(rows: &[Row], t: usize, cfg: &ModelConfig) -> (Array, Array) {
    let freqs = crate::model::rope::inv_freqs(cfg);
    let half = freqs.len();
    let (mut cos, mut sin) = (
        Vec::with_capacity(rows.len() * t * half),
        Vec::with_capacity(rows.len() * t * half),
    );
    for r in rows {
        for p in 0..t {
            let pos = r.positions.get(p).copied().unwrap_or(0) as f32;
            for f in &freqs {
                let angle = pos * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let shape = [rows.len() as i32, 1, t as i32, half as i32];
    (
        Array::from_slice(&cos, &shape),
        Array::from_slice(&sin, &shape),
    )
}
