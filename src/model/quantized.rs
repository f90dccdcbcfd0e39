//! Frozen linear weights that stay quantized in memory (QLoRA). A quantized weight is held in
//! row slices ([`QuantizedRows`]) and dequantized inside each matmul one slice at a time: the
//! forward computes `x · deq(W)ᵀ` and the backward's input gradient `dY · deq(W)`, so results
//! equal the dense computation on the dequantized weight, and no whole dense weight exists
//! (except for the fused CPU kernels, which take one f32 copy of one weight at a time). Dense
//! weights take the plain matmul, unchanged.

use super::sliced::linear_slice_rows;
pub use super::sliced::QuantizedRows;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Rows of a prompt up to which decoding reads dense weights as held
/// ([`Weight::matmul_t_decode`]); above it, the weight is widened once for the GEMM. On an
/// 8B-shaped bf16 model (2 cores) the prefill took 1.85 / 3.84 / 13.7 s for prompts of 11 /
/// 31 / 120 tokens read as held, against 13.6 / 14.1 / 16.2 s widened for the GEMM: the
/// widening (twice the weights' bytes written, and their pages faulted in) outweighs reading
/// the weights once per 8 rows until well past this.
pub const DENSE_DECODE_ROWS: usize = 128;

/// `--quantize 4|8`: the GGML block type dense weights are quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantBits {
    /// Q4_1: blocks of 32 weights with an f16 scale and an f16 offset (min) each, 5 bits/weight.
    Four,
    /// Q8_0: blocks of 32 weights with an f16 scale each, 8.5 bits/weight.
    Eight,
}

impl QuantBits {
    pub fn parse(bits: u8) -> Option<Self> {
        match bits {
            4 => Some(Self::Four),
            8 => Some(Self::Eight),
            _ => None,
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            Self::Four => 4,
            Self::Eight => 8,
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Four => GgmlDType::Q4_1,
            Self::Eight => GgmlDType::Q8_0,
        }
    }
}

/// Written as its number of bits (4 or 8), as `--quantize` takes it.
impl serde::Serialize for QuantBits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u8(self.bits())
    }
}

impl<'de> serde::Deserialize<'de> for QuantBits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bits = u8::deserialize(d)?;
        Self::parse(bits).ok_or_else(|| {
            serde::de::Error::custom(format!("{bits}: give 4 or 8 (bits per weight)"))
        })
    }
}

/// A linear layer's `[out, in]` weight, dense or quantized.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QuantizedRows>),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(w) => w.dims2(),
            Weight::Quantized(q) => Ok(q.dims2()),
        }
    }

    /// The weight as a dense tensor: a dense weight as held (in its own dtype), a quantized one
    /// dequantized to `dtype` (a fresh copy).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized(q) => q.dense(dtype),
        }
    }

    /// The weight in f32, as the fused CPU kernels take it: a dense f32 weight as held, a
    /// half-precision one widened and a quantized one dequantized (a fresh copy).
    pub fn f32(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => crate::kernels::to_f32(w),
            Weight::Quantized(q) => q.dense(DType::F32),
        }
    }

    /// `x Wᵀ` for 2-D `x`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => x.matmul(&in_dtype(w, x.dtype())?.t()?),
            Weight::Quantized(q) => q.matmul_t(x),
        }
    }

    /// `x Wᵀ` for decoding: a quantized weight's blocks read as stored, `x` rounded to 8 bits
    /// ([`QuantizedRows::matmul_t_decode`]); a dense weight read as held for a prompt's few
    /// rows ([`Weight::reads_rows`]).
    pub fn matmul_t_decode(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => {
                let (rows, cols) = x.dims2()?;
                if self.reads_rows(x) {
                    if let Some(m) = crate::kernels::matvec::Matrix::of(w) {
                        let xs = x.flatten_all()?.to_vec1::<f32>()?;
                        let (out_features, in_features) = m.dims();
                        let mut out = vec![0f32; rows * out_features];
                        if in_features == cols
                            && crate::kernels::matvec::matmul_rows(&m, &xs, rows, &mut out)
                        {
                            return Tensor::from_vec(out, (rows, out_features), x.device());
                        }
                    }
                }
                x.matmul(&in_dtype(w, x.dtype())?.t()?)
            }
            Weight::Quantized(q) => q.matmul_t_decode(x),
        }
    }

    /// Whether decoding reads this weight as stored for the rows of 2-D `x`: a quantized
    /// weight for one new token or a prompt's rows ([`QuantizedRows::reads_rows`]); a dense one on the CPU,
    /// for f32 `x` of up to [`DENSE_DECODE_ROWS`] rows when it is bf16/f16 (a short prompt: the
    /// weights are read once per 8 rows, where widening them for the GEMM writes twice their
    /// size), of up to [`crate::kernels::matvec::MAX_ROWS`] (one pass) when it is f32.
    pub fn reads_rows(&self, x: &Tensor) -> bool {
        let Ok(rows) = x.dim(0) else {
            return false;
        };
        match self {
            Weight::Quantized(q) => q.reads_rows(x),
            Weight::Dense(w) => {
                // f32 weights need no widening: past one pass the GEMM reads them once.
                let most = match w.dtype() {
                    DType::F32 => crate::kernels::matvec::MAX_ROWS,
                    _ => DENSE_DECODE_ROWS,
                };
                rows <= most
                    && x.dtype() == DType::F32
                    && x.device().is_cpu()
                    && w.device().is_cpu()
                    && crate::kernels::enabled()
            }
        }
    }

    /// `dy W` for 2-D `dy`: the input gradient of `x Wᵀ`.
    pub fn matmul(&self, dy: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => dy.matmul(&in_dtype(w, dy.dtype())?),
            Weight::Quantized(q) => q.matmul(dy),
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.bytes(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Weight::Quantized(_))
    }
}

impl Weight {
    /// Quantizes a dense `[out, in]` weight onto `device`, in row slices; `None` when its rows
    /// do not fill whole blocks (the weight then stays dense).
    pub fn quantize(w: &Tensor, bits: QuantBits, device: &Device) -> Result<Option<Self>> {
        let slice = linear_slice_rows(w.dims2()?.1);
        let q = QuantizedRows::quantize(w, bits.ggml(), slice, device)?;
        Ok(q.map(|q| Weight::Quantized(Arc::new(q))))
    }

    /// Keeps a quantized `[out, in]` tensor as stored, cut into row slices.
    pub fn from_qtensor(q: &QTensor, device: &Device) -> Result<Self> {
        let slice = linear_slice_rows(q.shape().dims2()?.1);
        let q = QuantizedRows::from_qtensor(q, slice, device)?;
        Ok(Weight::Quantized(Arc::new(q)))
    }
}

/// A dense weight in the dtype of what it multiplies: as held, or (half-precision weights
/// computed in f32) a converted copy.
pub fn in_dtype(w: &Tensor, dtype: DType) -> Result<Tensor> {
    match dtype {
        d if d == w.dtype() => Ok(w.clone()),
        DType::F32 => crate::kernels::to_f32(w),
        d => w.to_dtype(d),
    }
}

/// Quantizes a dense `[out, in]` weight as one tensor; `None` when its rows do not fill whole
/// blocks.
pub fn quantize(w: &Tensor, bits: QuantBits) -> Result<Option<QTensor>> {
    let (_, cols) = w.dims2()?;
    if !cols.is_multiple_of(bits.ggml().block_size()) {
        return Ok(None);
    }
    QTensor::quantize(&w.to_dtype(DType::F32)?, bits.ggml()).map(Some)
}

/// Reorders the rows of a quantized `[out, in]` tensor without dequantizing: GGML blocks never
/// straddle rows, so a row is a fixed run of bytes. `src_row[i]` is the row that lands at `i`.
pub fn permute_rows(q: &QTensor, src_row: &[usize], device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dt = q.dtype();
    if src_row.len() != rows || !cols.is_multiple_of(dt.block_size()) {
        candle_core::bail!("cannot permute rows of a {rows}x{cols} {dt:?} tensor");
    }
    let row_bytes = cols / dt.block_size() * dt.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &r in src_row {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    qtensor_from_ggml(dt, &out, vec![rows, cols], device)
}

/// Source rows of llama.cpp's q/k un-permutation (`[n, d/2, 2] → [n, 2, d/2]` on rows): output
/// row `(h, j, i)` of shape `[n, 2, d/2]` comes from stored row `(h, i, j)`.
pub fn unpermute_qk_rows(rows: usize, n_heads: usize) -> Vec<usize> {
    let half = rows / n_heads / 2;
    let mut src = Vec::with_capacity(rows);
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                src.push(h * 2 * half + i * 2 + j);
            }
        }
    }
    src
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::gguf::{permute_qk, unpermute_qk};

    fn rand(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn round_trip_error_is_within_the_format_bound() {
        // Q8_0: x ≈ d·q with d = max|x|/127 per block, so |err| ≤ d/2 (+ f16 rounding of d).
        // Q4_1: x ≈ d·q + m with d = (max − min)/15, so |err| ≤ d/2 (+ f16 rounding).
        for seed in 0..20 {
            let w = (rand(8, 256, seed) * (1.0 + seed as f64)).unwrap();
            let v = w.to_vec2::<f32>().unwrap();
            for bits in [QuantBits::Eight, QuantBits::Four] {
                let q = quantize(&w, bits).unwrap().unwrap();
                let back = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                for (row, brow) in v.iter().zip(&back) {
                    for (blk, bblk) in row.chunks(32).zip(brow.chunks(32)) {
                        let max = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let (lo, hi) = blk
                            .iter()
                            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                        let step = match bits {
                            QuantBits::Eight => max / 127.0,
                            QuantBits::Four => (hi - lo) / 15.0,
                        };
                        // Half a step, plus the f16 rounding of scale/offset carried over the block.
                        let bound = step * 0.5 + max * 2e-3 + 1e-6;
                        for (x, y) in blk.iter().zip(bblk) {
                            assert!((x - y).abs() <= bound, "{bits:?} {x} vs {y}, bound {bound}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_matmuls_equal_dense_on_the_dequantized_weight() {
        let w = rand(48, 64, 1);
        // More rows than decoding's block path takes (see the sliced tests for that path).
        let x = rand(12, 64, 2);
        let dy = rand(12, 48, 3);
        for bits in [QuantBits::Four, QuantBits::Eight] {
            let q = Weight::quantize(&w, bits, &Device::Cpu).unwrap().unwrap();
            let deq = q.dense(DType::F32).unwrap();
            // Independent: plain loops over the dequantized weight.
            let (wv, xv, dyv) = (
                deq.to_vec2::<f32>().unwrap(),
                x.to_vec2::<f32>().unwrap(),
                dy.to_vec2::<f32>().unwrap(),
            );
            let y = q.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap();
            let dx = q.matmul(&dy).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..12 {
                for o in 0..48 {
                    let want: f32 = (0..64).map(|i| xv[r][i] * wv[o][i]).sum();
                    assert!((y[r][o] - want).abs() < 1e-4);
                }
                for i in 0..64 {
                    let want: f32 = (0..48).map(|o| dyv[r][o] * wv[o][i]).sum();
                    assert!((dx[r][i] - want).abs() < 1e-4);
                }
            }
            assert!(max_abs(&(deq - &w).unwrap()) < 0.2);
            assert!(q.bytes() < 48 * 64 * 4 / 3);
        }
    }

    #[test]
    fn quantized_row_permutation_matches_dense_unpermute() {
        let w = rand(32, 64, 4);
        for heads in [1, 2, 4] {
            let stored = permute_qk(&w, heads).unwrap();
            let q = quantize(&stored, QuantBits::Eight).unwrap().unwrap();
            let src = unpermute_qk_rows(32, heads);
            let p = permute_rows(&q, &src, &Device::Cpu).unwrap();
            let want = unpermute_qk(&q.dequantize(&Device::Cpu).unwrap(), heads).unwrap();
            let got = p.dequantize(&Device::Cpu).unwrap();
            assert_eq!(max_abs(&(got - want).unwrap()), 0.0);
        }
    }

    /// A bf16 weight times f32 inputs: widened to f32 (exactly), in every product.
    #[test]
    fn a_half_precision_weight_multiplies_in_the_inputs_dtype() {
        let w = rand(24, 40, 3).to_dtype(DType::BF16).unwrap();
        let wide = w.to_dtype(DType::F32).unwrap();
        let weight = Weight::Dense(w);
        assert_eq!(weight.f32().unwrap().dtype(), DType::F32);
        let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
        assert_eq!(diff(&weight.f32().unwrap(), &wide), 0.0);
        let x = rand(5, 40, 4);
        let y = weight.matmul_t(&x).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(diff(&y, &x.matmul(&wide.t().unwrap()).unwrap()), 0.0);
        let dy = rand(5, 24, 5);
        assert_eq!(
            diff(&weight.matmul(&dy).unwrap(), &dy.matmul(&wide).unwrap()),
            0.0
        );
    }
}
