//! The one attention-mask builder, for inference and for training batches plain or packed.
//!
//! A query at position `p` sees key `j` when `j ≤ p` (causal), `p − j < window` (a sliding
//! window, Mistral-style, when the model has one) and, in a packed row, `j` belongs to the
//! same document as the query. The mask is additive: 0 where the key is seen, −∞ elsewhere.

use candle_core::{Device, Result, Tensor};

/// The `[t, offset + t]` mask values of queries at positions `offset..offset + t` against keys
/// `0..offset + t`; `doc(i)` is the document of position `i` (one value for all: unpacked).
pub fn values(
    t: usize,
    offset: usize,
    window: Option<usize>,
    doc: impl Fn(usize) -> u32,
) -> Vec<f32> {
    let total = offset + t;
    let window = window.unwrap_or(usize::MAX);
    let mut m = vec![f32::NEG_INFINITY; t * total];
    for i in 0..t {
        let pos = offset + i;
        for j in 0..=pos {
            if pos - j < window && doc(pos) == doc(j) {
                m[i * total + j] = 0.0;
            }
        }
    }
    m
}

/// Inference: the mask `[t, offset + t]` of `t` new positions after `offset` cached ones;
/// `None` when every query may see every key (a single new position within the window).
pub fn causal(
    t: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    if t == 1 && offset < window.unwrap_or(usize::MAX) {
        return Ok(None);
    }
    let m = values(t, offset, window, |_| 0);
    Tensor::from_vec(m, (t, offset + t), device).map(Some)
}

/// Training: the mask of a micro-batch of `b` rows of length `t`, `[1, 1, 1, t, t]` shared by
/// every row, or `[b, 1, 1, t, t]` when `docs` gives each row's document per position
/// (packed rows; positions past a row's end are padding, a document of their own).
pub fn batch(
    b: usize,
    t: usize,
    window: Option<usize>,
    docs: Option<&[&[u32]]>,
    device: &Device,
) -> Result<Tensor> {
    let Some(docs) = docs else {
        return Tensor::from_vec(values(t, 0, window, |_| 0), (1, 1, 1, t, t), device);
    };
    let mut m = Vec::with_capacity(b * t * t);
    for doc in docs {
        m.extend(values(t, 0, window, |i| {
            doc.get(i).copied().unwrap_or(u32::MAX)
        }));
    }
    Tensor::from_vec(m, (b, 1, 1, t, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `true` where the key is seen, row by row.
    fn seen(m: &Tensor) -> Vec<Vec<bool>> {
        let (t, total) = m.dims2().unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (0..t)
            .map(|i| (0..total).map(|j| v[i * total + j] == 0.0).collect())
            .collect()
    }

    #[test]
    fn a_packed_row_under_a_window_sees_its_own_document_within_the_window() {
        // Documents of 5 and 4 tokens packed in a row of 9, one padding position, window 3.
        let docs: [&[u32]; 2] = [&[0, 0, 0, 0, 0, 1, 1, 1, 1], &[0, 0, 0, 0, 0, 0, 0, 0]];
        let m = batch(2, 9, Some(3), Some(&docs), &Device::Cpu).unwrap();
        assert_eq!(m.dims(), [2, 1, 1, 9, 9]);
        let row = |b: usize| seen(&m.get(b).unwrap().reshape((9, 9)).unwrap());
        let packed = row(0);
        for (i, row) in packed.iter().enumerate() {
            for (j, &seen) in row.iter().enumerate() {
                let same_doc = (i < 5) == (j < 5);
                assert_eq!(seen, j <= i && i - j < 3 && same_doc, "({i}, {j})");
            }
        }
        // The first key of the second document is seen by its own queries only.
        assert!(packed[5][5] && !packed[5][4] && packed[7][5] && !packed[8][5]);
        // The second row: one document of 8, and padding that sees only itself.
        let plain = row(1);
        assert!(plain[7][5] && !plain[7][4] && !plain[8][7] && plain[8][8]);
    }

    #[test]
    fn the_packed_mask_of_one_document_is_the_plain_mask() {
        for window in [None, Some(2), Some(40)] {
            let plain = batch(1, 6, window, None, &Device::Cpu).unwrap();
            let one: [&[u32]; 1] = [&[0; 6]];
            let packed = batch(1, 6, window, Some(&one), &Device::Cpu).unwrap();
            let (a, b) = (
                plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                packed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b);
            let c = causal(6, 0, window, &Device::Cpu).unwrap().unwrap();
            assert_eq!(c.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a);
        }
    }

    #[test]
    fn inference_masks_follow_the_cache_and_the_window() {
        // One new position: no mask within the window, a mask once keys fall out of it.
        assert!(causal(1, 7, None, &Device::Cpu).unwrap().is_none());
        assert!(causal(1, 3, Some(4), &Device::Cpu).unwrap().is_none());
        let m = causal(1, 4, Some(4), &Device::Cpu).unwrap().unwrap();
        assert_eq!(seen(&m), [vec![false, true, true, true, true]]);
        // Two new positions after two cached ones.
        let m = causal(2, 2, None, &Device::Cpu).unwrap().unwrap();
        assert_eq!(
            seen(&m),
            [vec![true, true, true, false], vec![true, true, true, true]]
        );
    }
}
