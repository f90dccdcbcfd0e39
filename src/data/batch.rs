//! From encoded samples to micro-batches: a data order that is a pure function of the seed and
//! the epoch (so a cursor is enough to resume), right-padded batches, and packing of several
//! documents per row with per-document attention and positions.

use crate::data::Sample;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The per-example weights of a training set.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleWeights {
    /// Distrust D of each example (reported, never added to the loss).
    pub d: Vec<f64>,
    /// c of each example, as the loss uses it.
    pub c: Vec<f32>,
    /// D̄, the mean of D over the set.
    pub d_mean: f64,
}

/// One row of a batch: several documents when packed, else one.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// Position of each token inside its document.
    pub positions: Vec<u32>,
    /// Document number of each token inside the row.
    pub doc: Vec<u32>,
    /// Per-token loss weight (of the document it belongs to).
    pub weight: Vec<f32>,
    /// Distrust D of each document (indexed by `doc`), for reporting; empty when unweighted.
    pub doc_d: Vec<f32>,
}

impl Row {
    pub fn single(s: &Sample, weight: f32) -> Self {
        let n = s.ids.len();
        Row {
            ids: s.ids.clone(),
            trained: s.trained.clone(),
            positions: (0..n as u32).collect(),
            doc: vec![0; n],
            weight: vec![weight; n],
            doc_d: vec![],
        }
    }

    /// Records the distrust D of each of the row's documents.
    pub fn with_doc_d(mut self, d: Vec<f32>) -> Self {
        self.doc_d = d;
        self
    }

    /// Σ loss weight over the scored tokens: the row's share of the loss normaliser.
    pub fn scored_weight(&self) -> f64 {
        (1..self.len())
            .filter(|&p| self.trained[p] && self.doc[p] == self.doc[p - 1])
            .map(|p| self.weight[p] as f64)
            .sum()
    }

    fn push_doc(&mut self, s: &Sample, weight: f32) {
        let d = self.doc.last().map(|d| d + 1).unwrap_or(0);
        self.ids.extend_from_slice(&s.ids);
        self.trained.extend_from_slice(&s.trained);
        self.positions.extend(0..s.ids.len() as u32);
        self.doc.extend(std::iter::repeat_n(d, s.ids.len()));
        self.weight.extend(std::iter::repeat_n(weight, s.ids.len()));
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Scored tokens: trained, and predicted from a token of the same document.
    pub fn scored(&self) -> usize {
        (1..self.len())
            .filter(|&p| self.trained[p] && self.doc[p] == self.doc[p - 1])
            .count()
    }
}

/// The padded length the MLX engine lays rows of at most `t` tokens out at, so a run sees a
/// handful of shapes: multiples of 32 up to 256, of 128 up to 1024, of 512 beyond.
pub fn bucket(t: usize) -> usize {
    let step = match t {
        0..=256 => 32,
        257..=1024 => 128,
        _ => 512,
    };
    t.max(1).div_ceil(step) * step
}

/// Packs samples (in the given order) greedily into rows of at most `max_len` tokens.
pub fn pack(samples: &[&Sample], weights: &[f32], max_len: usize) -> Vec<Row> {
    pack_with_d(samples, weights, None, max_len)
}

/// [`pack`], also recording each document's distrust D when given.
pub fn pack_with_d(
    samples: &[&Sample],
    weights: &[f32],
    d: Option<&[f32]>,
    max_len: usize,
) -> Vec<Row> {
    let mut rows: Vec<Row> = vec![];
    let mut cur: Option<Row> = None;
    for (i, (s, &w)) in samples.iter().zip(weights).enumerate() {
        match cur.as_mut() {
            Some(r) if r.len() + s.ids.len() <= max_len => r.push_doc(s, w),
            _ => {
                if let Some(r) = cur.take() {
                    rows.push(r);
                }
                cur = Some(Row::single(s, w));
            }
        }
        if let (Some(r), Some(d)) = (cur.as_mut(), d) {
            r.doc_d.push(d[i]);
        }
    }
    rows.extend(cur);
    rows
}

/// Training samples as rows (packed, or one per sample), with each example's loss weight c and
/// distrust D when given.
pub fn weighted_rows(
    samples: &[Sample],
    weights: Option<&ExampleWeights>,
    pack_rows: bool,
    max_len: usize,
) -> Vec<Row> {
    let c: Vec<f32> = match weights {
        Some(w) => w.c.clone(),
        None => vec![1.0; samples.len()],
    };
    let d: Option<Vec<f32>> = weights.map(|w| w.d.iter().map(|&d| d as f32).collect());
    if pack_rows {
        let refs: Vec<&Sample> = samples.iter().collect();
        pack_with_d(&refs, &c, d.as_deref(), max_len)
    } else {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let row = Row::single(s, c[i]);
                match &d {
                    Some(d) => row.with_doc_d(vec![d[i]]),
                    None => row,
                }
            })
            .collect()
    }
}

/// The order in which examples are visited: a fresh shuffle per epoch, derived from the seed.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut epoch_rng(seed, epoch));
    order
}

fn epoch_rng(seed: u64, epoch: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Shuffled rows per group of this many batches are sorted by length before batching.
const LENGTH_GROUP_BATCHES: usize = 16;

/// The epoch's order with batches of similar lengths, as mlx-lm and `group_by_length` do: the
/// shuffled rows are cut into groups of [`LENGTH_GROUP_BATCHES`] batches, each group sorted by
/// length and split into batches, then the batches are shuffled. Padding — computed and thrown
/// away — shrinks, while every epoch still visits the rows in a new random order.
pub fn grouped_order(lens: &[usize], batch_size: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order = epoch_order(lens.len(), seed, epoch);
    let bs = batch_size.max(1);
    let full = order.len() / bs * bs;
    for group in order[..full].chunks_mut(bs * LENGTH_GROUP_BATCHES) {
        group.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    }
    let mut batches: Vec<&[usize]> = order[..full].chunks(bs).collect();
    batches.shuffle(&mut epoch_rng(seed.wrapping_add(1), epoch));
    // The longest batch first, as `group_by_length` does: the step's memory high-water mark
    // (which the allocator then keeps for reuse) is reached at once, and a run that cannot fit
    // fails at its first step rather than hours in.
    let longest = |b: &&[usize]| b.iter().map(|&i| lens[i]).max().unwrap_or(0);
    if let Some(first) =
        (0..batches.len()).max_by_key(|&k| (longest(&batches[k]), std::cmp::Reverse(k)))
    {
        batches.swap(0, first);
    }
    let mut out: Vec<usize> = batches.concat();
    out.extend_from_slice(&order[full..]);
    out
}

/// Walks through batches of rows epoch after epoch; `(epoch, position)` is the whole state.
/// The unit of shuffling and batching is a row, or a pair of rows (a preference pair's chosen
/// and rejected answers, which always travel together, in that order).
#[derive(Debug, Clone)]
pub struct Batcher {
    /// Each unit's rows.
    pub units: Vec<Vec<Row>>,
    /// Units per batch.
    pub batch_size: usize,
    pub seed: u64,
    pub epoch: u64,
    pub position: usize,
    lens: Vec<usize>,
    order: Vec<usize>,
}

impl Batcher {
    pub fn new(rows: Vec<Row>, batch_size: usize, seed: u64) -> Self {
        Self::of_units(
            rows.into_iter().map(|r| vec![r]).collect(),
            batch_size,
            seed,
        )
    }

    /// Batches of `batch_size` units, each unit's rows kept together.
    pub fn of_units(units: Vec<Vec<Row>>, batch_size: usize, seed: u64) -> Self {
        let lens: Vec<usize> = units
            .iter()
            .map(|u| u.iter().map(Row::len).max().unwrap_or(0))
            .collect();
        let order = grouped_order(&lens, batch_size, seed, 0);
        Self {
            lens,
            units,
            batch_size,
            seed,
            epoch: 0,
            position: 0,
            order,
        }
    }

    /// Continues from a saved cursor.
    pub fn restore(&mut self, epoch: u64, position: usize) {
        self.epoch = epoch;
        self.position = position;
        self.order = grouped_order(&self.lens, self.batch_size, self.seed, epoch);
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.units.len() / self.batch_size
    }

    /// The next batch's rows; an epoch's remainder smaller than a batch is skipped.
    pub fn next_batch(&mut self) -> Vec<&Row> {
        if self.position + self.batch_size > self.order.len() {
            self.epoch += 1;
            self.position = 0;
            self.order = grouped_order(&self.lens, self.batch_size, self.seed, self.epoch);
        }
        let idx = &self.order[self.position..self.position + self.batch_size];
        self.position += self.batch_size;
        idx.iter().flat_map(|&i| &self.units[i]).collect()
    }
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

    fn sample(n: usize) -> Sample {
        Sample {
            ids: (0..n as u32).collect(),
            trained: vec![true; n],
            truncated: 0,
            untrained_turns: 0,
        }
    }

    #[test]
    fn packing_restarts_positions_and_never_crosses_documents() {
        let (a, b, c) = (sample(3), sample(4), sample(5));
        let rows = pack(&[&a, &b, &c], &[1.0, 1.0, 1.0], 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].positions, vec![0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(rows[0].doc, vec![0, 0, 0, 1, 1, 1, 1]);
        // 2 + 3 scored tokens: the first token of each document is never a target.
        assert_eq!(rows[0].scored(), 5);
    }

    #[test]
    fn packed_rows_keep_each_documents_weight_and_d() {
        let (a, b, c) = (sample(3), sample(4), sample(5));
        let rows = pack_with_d(&[&a, &b, &c], &[0.5, 2.0, 1.0], Some(&[1.0, 9.0, 4.0]), 8);
        assert_eq!(rows[0].doc_d, vec![1.0, 9.0]);
        assert_eq!(rows[1].doc_d, vec![4.0]);
        // 2 scored tokens at 0.5 and 3 at 2.0.
        assert_eq!(rows[0].scored_weight(), 7.0);
        assert!(pack(&[&a], &[1.0], 8)[0].doc_d.is_empty());
    }

    #[test]
    fn grouped_batches_pad_less_and_keep_every_row() {
        let lens: Vec<usize> = (0..200).map(|i| 10 + (i * 37) % 90).collect();
        let order = grouped_order(&lens, 4, 5, 0);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>());
        let padding = |o: &[usize]| -> usize {
            o.chunks(4)
                .map(|b| {
                    b.iter().map(|&i| lens[i]).max().unwrap() * 4
                        - b.iter().map(|&i| lens[i]).sum::<usize>()
                })
                .sum()
        };
        let random = padding(&epoch_order(200, 5, 0));
        assert!(
            padding(&order) * 3 < random,
            "grouped {} vs random {random}",
            padding(&order)
        );
        assert_ne!(grouped_order(&lens, 4, 5, 1), order);
        for epoch in 0..3 {
            let order = grouped_order(&lens, 4, 5, epoch);
            let longest = order[..order.len() / 4 * 4].iter().map(|&i| lens[i]).max();
            assert_eq!(
                order[..4].iter().map(|&i| lens[i]).max(),
                longest,
                "epoch {epoch}"
            );
        }
    }

    #[test]
    fn order_is_a_function_of_seed_and_epoch() {
        assert_eq!(epoch_order(50, 1, 0), epoch_order(50, 1, 0));
        assert_ne!(epoch_order(50, 1, 0), epoch_order(50, 1, 1));
        assert_ne!(epoch_order(50, 1, 0), epoch_order(50, 2, 0));
        let rows: Vec<Row> = (1..=10).map(|n| Row::single(&sample(n + 1), 1.0)).collect();
        let mut b = Batcher::new(rows, 3, 7);
        let mut seen = vec![];
        for _ in 0..3 {
            seen.extend(b.next_batch().into_iter().map(|r| r.len()));
        }
        assert_eq!(seen.len(), 9);
        b.next_batch();
        assert_eq!((b.epoch, b.position), (1, 3));
    }
}
