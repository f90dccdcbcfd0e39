//! Rows of token ids laid out for the MLX step: right-padded ids, the scored positions, and the
//! attention mask. Lengths are rounded up to a few buckets, so a run sees a handful of shapes
//! (MLX's allocator, and any compiled trace, is reused per shape) instead of one per length.
//! Right padding never changes a real position's result: attention is causal, so no real token
//! sees a pad.

use super::convert::indices;
use crate::data::batch::Row;
use crate::error::{Error, Result};
use mlx_rs::Array;

/// The padded length for rows of at most `t` tokens: multiples of 32 up to 256, of 128 up to
/// 1024, of 512 beyond.
pub fn bucket(t: usize) -> usize {
    let step = match t {
        0..=256 => 32,
        257..=1024 => 128,
        _ => 512,
    };
    t.max(1).div_ceil(step) * step
}

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
    /// An additive `[T, T]` mask where causal alone is not the rule (a sliding window); None:
    /// causal.
    pub mask: Option<Array>,
}

/// Lays out `rows` for a model with attention window `window`.
pub fn layout(rows: &[Row], window: Option<usize>) -> Result<Layout> {
    if rows.iter().any(|r| r.doc.last().copied().unwrap_or(0) > 0) {
        return Err(Error::Usage(
            "--pack: the MLX engine does not train packed rows yet; train without --pack, \
             or with --engine candle"
                .into(),
        ));
    }
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
    let mask = window.map(|w| {
        let mut m = vec![f32::NEG_INFINITY; t * t];
        for i in 0..t {
            for j in i.saturating_sub(w - 1)..=i {
                m[i * t + j] = 0.0;
            }
        }
        Array::from_slice(&m, &[t as i32, t as i32])
    });
    Ok(Layout {
        b,
        t,
        ids: indices(&ids, &[(b * t) as i32]),
        target_rows,
        target_ids,
        target_weights,
        mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_fall_into_few_buckets() {
        assert_eq!(bucket(1), 32);
        assert_eq!(bucket(32), 32);
        assert_eq!(bucket(33), 64);
        assert_eq!(bucket(300), 384);
        assert_eq!(bucket(2000), 2048);
        let shapes: std::collections::BTreeSet<usize> = (1..=2048).map(bucket).collect();
        assert!(shapes.len() <= 20, "{} shapes", shapes.len());
    }
}
