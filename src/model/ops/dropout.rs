//! The LoRA dropout mask: entries 0 (probability `p`) or `1/(1−p)`, a pure function of
//! `(seed, block, target, position)`, so the backward's recompute and a row chunk of the input
//! draw the same mask again, and a resumed run draws the masks it would have drawn.
//!
//! On the CPU the mask is hashed on the host (splitmix64 per entry) for the fused kernels. On a
//! GPU it is hashed on the device from the entries' indices with integer tensor ops, so nothing
//! of the size of an activation crosses the bus; the two generators draw different masks, so a
//! dropout run on a GPU drops other entries than the same run on the CPU (without dropout the
//! two give the same losses).

use crate::model::lora::Target;
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

/// The dropout mask of one LoRA input, for rows `rows` of it (`cols` wide), in `like`'s dtype
/// and on its device.
pub fn dropout_mask(
    p: f64,
    seed: u64,
    layer: usize,
    target: Target,
    rows: Range<usize>,
    cols: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let stream = seed ^ ((layer as u64) << 40) ^ ((target.index() as u64) << 56);
    match like.device() {
        Device::Cpu => host_mask(p, stream, rows, cols)?.to_dtype(like.dtype()),
        device => device_mask(p, stream, rows, cols, like.dtype(), device),
    }
}

/// The host's mask: splitmix64 of each entry's index in the stream.
fn host_mask(p: f64, stream: u64, rows: Range<usize>, cols: usize) -> Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let n = rows.len();
    let data: Vec<f32> = ((rows.start * cols) as u64..(rows.end * cols) as u64)
        .map(|i| {
            if splitmix64(stream.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 11
                < threshold
            {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Tensor::from_vec(data, (n, cols), &Device::Cpu)
}

/// 2³¹ − 1, a prime: every value below stays under 2³¹, so a product of two stays under 2⁶²
/// and i64 arithmetic never overflows.
const PRIME: i64 = 2_147_483_647;

/// Entries hashed at a time on the device: the i64 temporaries of a chunk stay within a few
/// tens of MB (a whole `[2048, 14336]` input would need about 1 GB of them).
const DEVICE_CHUNK: usize = 1 << 22;

/// Bytes the device's hashing holds at once besides the mask: five i64 arrays of a chunk at
/// most (the value being reduced, its quotient, the quotient times the prime, the result, and
/// the previous value or the index), and the chunk's u8, f32 and converted results.
pub const DEVICE_MASK_WORK: u64 = (DEVICE_CHUNK * (5 * 8 + 1 + 4 + 4)) as u64;

/// The device's mask: each entry's index `i` mapped into the field of [`PRIME`] by an affine
/// map of the stream's own (a different permutation of the indices per block and target), then
/// mixed by two rounds of `x ← a·x + b`, `x ← x² + c`; an entry is dropped where the result is
/// below `p·PRIME`. Built from small index vectors uploaded once and elementwise i64 ops, in
/// chunks of rows.
pub fn device_mask(
    p: f64,
    stream: u64,
    rows: Range<usize>,
    cols: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if rows.is_empty() {
        return Tensor::zeros((0, cols), dtype, device);
    }
    let parts = super::row_chunks(rows.len(), DEVICE_CHUNK / cols.max(1))
        .map(|(start, len)| {
            let r0 = rows.start + start;
            device_mask_rows(p, stream, r0..r0 + len, cols, device)?.to_dtype(dtype)
        })
        .collect::<Result<Vec<_>>>()?;
    super::cat_rows(parts)
}

fn device_mask_rows(
    p: f64,
    stream: u64,
    rows: Range<usize>,
    cols: usize,
    device: &Device,
) -> Result<Tensor> {
    // Below 2³¹, so exact as the f64 that `affine` takes, and the products stay under 2⁶².
    let constant = |k: u64| ((splitmix64(stream ^ k) % (PRIME as u64 - 1)) + 1) as f64;
    let prime = Tensor::new(PRIME, device)?;
    // x mod PRIME for 0 ≤ x < 2⁶³: x − ⌊x / PRIME⌋·PRIME.
    let field = |x: Tensor| -> Result<Tensor> {
        let q = x.broadcast_div(&prime)?.affine(PRIME as f64, 0.0)?;
        x - q
    };
    let index = Tensor::arange(rows.start as i64, rows.end as i64, device)?
        .affine(cols as f64, 0.0)?
        .unsqueeze(1)?
        .broadcast_add(&Tensor::arange(0i64, cols as i64, device)?.unsqueeze(0)?)?;
    let mut x = field(index.affine(constant(1), constant(2))?)?;
    drop(index);
    for round in 0..2u64 {
        x = field(x.affine(constant(3 + 2 * round), constant(4 + 2 * round))?)?;
        x = field((&x * &x)?.affine(1.0, constant(9 + round))?)?;
    }
    let threshold = Tensor::new((p * PRIME as f64) as i64, device)?;
    x.broadcast_ge(&threshold)?
        .to_dtype(DType::F32)?
        .affine(1.0 / (1.0 - p), 0.0)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_of_the_dropout_mask_is_that_part_of_the_whole_mask() {
        let like = Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap();
        let whole = dropout_mask(0.4, 7, 3, Target::Down, 0..10, 6, &like).unwrap();
        let part = dropout_mask(0.4, 7, 3, Target::Down, 4..9, 6, &like).unwrap();
        let want = whole.narrow(0, 4, 5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(part.to_vec2::<f32>().unwrap(), want);
        // About 40% dropped, the rest scaled by 1/(1-p).
        let v = whole.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count();
        assert!((12..=36).contains(&dropped), "{dropped} of 60 dropped");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.6).abs() < 1e-6));
    }

    /// The device generator, run here on the CPU device: whether each entry is dropped.
    fn dropped(p: f64, stream: u64, rows: Range<usize>, cols: usize) -> Vec<Vec<bool>> {
        let m = device_mask(p, stream, rows, cols, DType::F32, &Device::Cpu).unwrap();
        let m = m.to_vec2::<f32>().unwrap();
        m.iter()
            .map(|r| {
                r.iter()
                    .map(|&v| {
                        assert!(v == 0.0 || (v as f64 - 1.0 / (1.0 - p)).abs() < 1e-6, "{v}");
                        v == 0.0
                    })
                    .collect()
            })
            .collect()
    }

    /// The share of `true` in `pairs`, and how far it may be from `want` by chance (5σ).
    fn share_near(pairs: impl Iterator<Item = bool>, want: f64, what: &str) {
        let (mut n, mut hits) = (0usize, 0usize);
        for h in pairs {
            n += 1;
            hits += h as usize;
        }
        let share = hits as f64 / n as f64;
        let sigma = (want * (1.0 - want) / n as f64).sqrt();
        assert!(
            (share - want).abs() <= 5.0 * sigma,
            "{what}: {share:.4} against {want:.4} (σ {sigma:.5}, {n} samples)"
        );
    }

    #[test]
    fn the_device_mask_is_a_function_of_position_and_drops_p_of_the_entries() {
        let (rows, cols) = (700, 1024);
        for p in [0.05, 0.1, 0.5] {
            let m = dropped(p, 11, 0..rows, cols);
            share_near(m.iter().flatten().copied(), p, "dropped");
            // Neighbours along a row and down a column are independent: both dropped p².
            share_near(
                m.iter().flat_map(|r| r.windows(2).map(|w| w[0] && w[1])),
                p * p,
                "neighbours in a row",
            );
            share_near(
                m.windows(2)
                    .flat_map(|r| r[0].iter().zip(&r[1]).map(|(a, b)| *a && *b)),
                p * p,
                "neighbours in a column",
            );
        }
        // Past one device chunk of entries, the same as row by row.
        let wide = DEVICE_CHUNK / 3 + 7;
        let m = dropped(0.2, 9, 0..5, wide);
        for r in [0, 3, 4] {
            assert_eq!(dropped(0.2, 9, r..r + 1, wide)[0], m[r], "row {r}");
        }
        // A row chunk is that part of the whole mask, on any device.
        let whole = dropped(0.3, 5, 0..40, 96);
        assert_eq!(dropped(0.3, 5, 17..33, 96), whole[17..33].to_vec());
        assert_eq!(dropped(0.3, 5, 0..40, 96), whole, "not reproducible");
        let none = device_mask(0.3, 5, 7..7, 96, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!((none.dims(), none.dtype()), (&[0, 96][..], DType::BF16));
    }

    #[test]
    fn device_masks_of_other_blocks_and_targets_are_independent() {
        let (rows, cols, p) = (300, 512, 0.3);
        let stream = |seed: u64, layer: u64, target: u64| seed ^ (layer << 40) ^ (target << 56);
        let a = dropped(p, stream(1, 3, 0), 0..rows, cols);
        for (b, what) in [
            (stream(1, 4, 0), "the next block"),
            (stream(1, 3, 1), "the next target"),
            (stream(2, 3, 0), "the next seed"),
        ] {
            let b = dropped(p, b, 0..rows, cols);
            share_near(
                a.iter()
                    .flatten()
                    .zip(b.iter().flatten())
                    .map(|(x, y)| *x && *y),
                p * p,
                what,
            );
            // Nor is one a shifted copy of the other, a row or an entry down.
            share_near(
                a[1..]
                    .iter()
                    .flatten()
                    .zip(b.iter().flatten())
                    .map(|(x, y)| *x && *y),
                p * p,
                what,
            );
        }
    }
}
