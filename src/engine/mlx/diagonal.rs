//! Where the step's lowered adapter lies ([`super::lowered`]): each group of linears that read
//! one input (`Target::BY_INPUT`) has its A matrices stacked, a view of the A bank, and a
//! block-diagonal B in one vector for the whole model, filled from the B bank by a gather of
//! rank-wide rows. Laid out once for an adapter's shapes (it walks every row of every B: at
//! 8B, 1.4 million rows, and its two index vectors hold about 16 MB) and kept with it.

use crate::model::lora::Target;
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

type R<T> = Result<T, Exception>;

/// A block's `(A, B)` views by group (None: no target of the group carries a pair).
pub type Groups = [Option<(Array, Array)>; 4];

/// Where each group's tensors lie: in the A bank, and in the block-diagonal B vector.
pub struct Plan {
    /// For each rank-wide row of the block-diagonal vector, its row of the B bank, or the
    /// zero row after the bank's last.
    pub fill: Array,
    /// For each row of the B bank, its row of the block-diagonal vector.
    pub back: Array,
    /// `[block][group]`: the A view's start and shape, the B view's start and shape.
    spans: Vec<[Option<Span>; 4]>,
    /// The model's output widths it was laid out for.
    pub widths: [i32; 7],
}

#[derive(Clone, Copy)]
struct Span {
    a: (i32, [i32; 2]),
    b: (i32, [i32; 2]),
}

impl Plan {
    /// The layout of blocks whose targets `present` carry pairs of rank `rank`, of the
    /// adapter's `shapes` (A, B of each pair, in adapter order) on a model whose linears have
    /// output widths `widths` (a group's B spans all its targets' outputs, present or not).
    pub fn new(present: &[[bool; 7]], shapes: &[[i32; 2]], widths: [i32; 7], rank: i32) -> R<Self> {
        let wrong = |what: String| Exception::custom(format!("the adapter's {what}"));
        let mut pairs = shapes.chunks(2);
        let (mut a_at, mut d_rows) = (0i64, 0i64);
        let mut fill: Vec<u32> = vec![];
        let mut back: Vec<u32> = vec![];
        let mut spans = Vec::with_capacity(present.len());
        for p in present {
            let mut block: [Option<Span>; 4] = [None; 4];
            for (slot, g) in block.iter_mut().zip(Target::BY_INPUT) {
                let ts: Vec<usize> = g.clone().filter(|&t| p[t]).collect();
                let k = ts.len() as i32;
                if k == 0 {
                    continue;
                }
                let outs: i32 = widths[g.clone()].iter().sum();
                let mut inp = None;
                let d_base = d_rows;
                fill.resize(fill.len() + (outs * k) as usize, u32::MAX);
                for (j, &t) in ts.iter().enumerate() {
                    let Some([[ra, ca], [ob, rb]]) = pairs.next().and_then(|c| match c {
                        [a, b] => Some([*a, *b]),
                        _ => None,
                    }) else {
                        return Err(wrong("tensors are fewer than its pairs".into()));
                    };
                    if ra != rank || rb != rank || ob != widths[t] || *inp.get_or_insert(ca) != ca {
                        return Err(wrong(format!(
                            "pair of shapes [{ra}, {ca}] and [{ob}, {rb}] does not fit rank \
                             {rank} on an output of {} shared by its group",
                            widths[t]
                        )));
                    }
                    let off: i32 = widths[g.start..t].iter().sum();
                    for o in 0..ob as i64 {
                        let row = d_base + (off as i64 + o) * k as i64 + j as i64;
                        fill[row as usize] = back.len() as u32;
                        back.push(row as u32);
                    }
                }
                let cols = inp.unwrap_or(0);
                *slot = Some(Span {
                    a: (a_at as i32, [k * rank, cols]),
                    b: ((d_base * rank as i64) as i32, [outs, k * rank]),
                });
                a_at += (k * rank) as i64 * cols as i64;
                d_rows += (outs * k) as i64;
            }
            spans.push(block);
        }
        if pairs.next().is_some() {
            return Err(wrong("tensors outnumber its pairs".into()));
        }
        if d_rows * rank as i64 > i32::MAX as i64 {
            return Err(Exception::custom(format!(
                "the adapter's block-diagonal B matrices need {} values, more than MLX's 32-bit \
                 sizes allow: use a lower --lora-rank, fewer --lora-targets or --num-layers",
                d_rows * rank as i64
            )));
        }
        let zero = back.len() as u32;
        for f in &mut fill {
            if *f == u32::MAX {
                *f = zero;
            }
        }
        let n = |v: &Vec<u32>| v.len() as i32;
        Ok(Self {
            fill: super::convert::indices(&fill, &[n(&fill)]),
            back: super::convert::indices(&back, &[n(&back)]),
            spans,
            widths,
        })
    }

    /// Each block's group views of the lowered A bank `a` and block-diagonal vector `diag`.
    pub fn views(&self, a: &Array, diag: &Array) -> R<Vec<Groups>> {
        let view = |v: &Array, (start, [r, c]): (i32, [i32; 2])| -> R<Array> {
            v.try_index(start..start + r * c)?.reshape(&[r, c])
        };
        self.spans
            .iter()
            .map(|block| {
                let mut out: Groups = Default::default();
                for (slot, span) in out.iter_mut().zip(block) {
                    if let Some(s) = span {
                        *slot = Some((view(a, s.a)?, view(diag, s.b)?));
                    }
                }
                Ok(out)
            })
            .collect()
    }
}
