//! The token embeddings and the LM head, `[vocab, hidden]` each, dense or quantized.
//!
//! At Llama-3 shapes each is 525M weights, 1.05 GB in bf16: with a 4-bit base they would be a
//! third of the frozen weights. Quantized, they are held as slices of [`SLICE_ROWS`]
//! vocabulary rows, and every use dequantizes one slice at a time: a lookup gathers its rows
//! from the slices it touches, the head's `h·Wᵀ` fills the logits slice by slice and its input
//! gradient `dlogits·W` sums over them. Results equal the dense computation on the dequantized
//! matrix, and no dense copy of the whole matrix exists (one slice is 64 MB in bf16 at
//! Llama-3 shapes, against 1.05 GB). A dense matrix held in bf16/f16 while the model computes
//! in f32 (training on the CPU) is used in the same slices, each widened in turn.

use super::sliced::QuantizedRows;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Vocabulary rows per quantized slice.
pub const SLICE_ROWS: usize = 8192;

#[derive(Debug, Clone)]
pub enum VocabMatrix {
    Dense(Tensor),
    Quantized(Arc<QuantizedRows>),
}

impl VocabMatrix {
    /// Quantizes a dense `[vocab, hidden]` matrix to `dt` in slices of `slice_rows`; stays
    /// dense when its rows do not fill whole blocks.
    pub fn quantize(w: &Tensor, dt: GgmlDType, slice_rows: usize, device: &Device) -> Result<Self> {
        match QuantizedRows::quantize(w, dt, slice_rows, device)? {
            Some(q) => Ok(Self::Quantized(Arc::new(q))),
            None => Ok(Self::Dense(w.to_device(device)?)),
        }
    }

    /// Keeps an already quantized `[vocab, hidden]` tensor (a GGUF's own), cut into slices
    /// without dequantizing: GGML blocks never straddle rows.
    pub fn from_quantized(q: &QTensor, slice_rows: usize, device: &Device) -> Result<Self> {
        Ok(Self::Quantized(Arc::new(QuantizedRows::from_qtensor(
            q, slice_rows, device,
        )?)))
    }

    /// `(vocab, hidden)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => Ok(q.dims2()),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized(_))
    }

    /// The quantized block type, when quantized.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized(q) => Some(q.dtype()),
        }
    }

    /// Whether both are the same matrix (tied embeddings).
    pub fn same_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Dense(a), Self::Dense(b)) => a.id() == b.id(),
            (Self::Quantized(a), Self::Quantized(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Quantized(q) => q.bytes(),
        }
    }

    /// `(first row, rows)` of each slice: one for a dense f32 matrix; slices of [`SLICE_ROWS`]
    /// for a dense matrix of any other dtype, which f32 products convert a slice at a time
    /// (one f32 copy of Llama-3's matrix would be 2.1 GB).
    pub fn slices(&self) -> Vec<(usize, usize)> {
        match self {
            Self::Dense(w) if w.dtype() == DType::F32 => vec![(0, w.dim(0).unwrap_or(0))],
            Self::Dense(w) => super::ops::row_chunks(w.dim(0).unwrap_or(0), SLICE_ROWS).collect(),
            Self::Quantized(q) => q.ranges(),
        }
    }

    /// Slice `i` of [`VocabMatrix::slices`] as a dense `[rows, hidden]` tensor in `dtype` (a
    /// dense matrix's rows as held or converted, a quantized slice dequantized afresh).
    pub fn slice(&self, i: usize, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => {
                let (first, rows) = self.slices()[i];
                super::quantized::in_dtype(&w.narrow(0, first, rows)?, dtype)
            }
            Self::Quantized(q) => q.slice(i, dtype),
        }
    }

    /// Rows `ids` (1-D, u32) as `[n, hidden]` in `dtype`: the embedding lookup.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let q = match self {
            Self::Dense(w) => return w.index_select(ids, 0)?.to_dtype(dtype),
            Self::Quantized(q) => q,
        };
        let (vocab, hidden) = q.dims2();
        let list = ids.to_vec1::<u32>()?;
        if let Some(&bad) = list.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let device = ids.device();
        if q.on_cpu() {
            // On the CPU the blocks are at hand: dequantize just the rows asked for (a lookup
            // touches a few thousand rows; dequantizing whole slices cost more than the step's
            // head on small models).
            let dt = q.dtype();
            let row_bytes = hidden / dt.block_size() * dt.type_size();
            let slice_rows = q.slice_rows();
            let mut out = Vec::with_capacity(list.len() * hidden);
            let data = (0..q.ranges().len())
                .map(|i| q.slice_data(i))
                .collect::<Result<Vec<_>>>()?;
            for &id in &list {
                let (s, r) = (id as usize / slice_rows, id as usize % slice_rows);
                let bytes = &data[s][r * row_bytes..(r + 1) * row_bytes];
                let row = qtensor_from_ggml(dt, bytes, vec![1, hidden], &Device::Cpu)?;
                out.extend(
                    row.dequantize(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            return Tensor::from_vec(out, (list.len(), hidden), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device);
        }
        self.rows_by_slice(q, &list, dtype, device)
    }

    /// The lookup off the CPU: slice by slice in sorted order, then the rows back in the ids'
    /// order.
    fn rows_by_slice(
        &self,
        q: &QuantizedRows,
        list: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let slice_rows = q.slice_rows();
        let mut order: Vec<usize> = (0..list.len()).collect();
        order.sort_by_key(|&i| list[i]);
        let mut parts = vec![];
        let mut at = 0;
        while at < order.len() {
            let s = list[order[at]] as usize / slice_rows;
            let s0 = s * slice_rows;
            let mut local = vec![];
            while at < order.len() && list[order[at]] as usize / slice_rows == s {
                local.push(list[order[at]] - s0 as u32);
                at += 1;
            }
            let local = Tensor::new(local.as_slice(), device)?;
            parts.push(self.slice(s, dtype)?.index_select(&local, 0)?);
        }
        if parts.is_empty() {
            return Tensor::zeros((0, q.dims2().1), dtype, device);
        }
        let mut back = vec![0u32; order.len()];
        for (j, &i) in order.iter().enumerate() {
            back[i] = j as u32;
        }
        Tensor::cat(&parts, 0)?.index_select(&Tensor::new(back.as_slice(), device)?, 0)
    }

    /// `h Wᵀ` for 2-D `h`: `[n, vocab]` in h's dtype.
    pub fn matmul_t(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) if w.dtype() == h.dtype() => h.matmul(&w.t()?),
            Self::Dense(_) => self.dense_by_slice_t(h),
            Self::Quantized(q) => q.matmul_t(h),
        }
    }

    /// [`VocabMatrix::matmul_t`] for decoding: the block path, with the leading logits exact
    /// ([`QuantizedRows::matmul_t_refined`]): they decide the token. A dense matrix is read as
    /// a dense linear weight is ([`super::quantized::Weight::matmul_t_decode`]).
    pub fn matmul_t_decode(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => {
                // Read as held for a few rows; else by slices (never one f32 copy of it all).
                let w = super::quantized::Weight::Dense(w.clone());
                if w.reads_rows(h) {
                    w.matmul_t_decode(h)
                } else {
                    self.matmul_t(h)
                }
            }
            Self::Quantized(q) => q.matmul_t_refined(h),
        }
    }

    /// `d W` for 2-D `d` (`[n, vocab]`): the input gradient of [`VocabMatrix::matmul_t`].
    pub fn matmul(&self, d: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) if w.dtype() == d.dtype() => d.matmul(w),
            Self::Dense(_) => {
                let mut sum: Option<Tensor> = None;
                for (i, (first, rows)) in self.slices().into_iter().enumerate() {
                    let part = d
                        .narrow(1, first, rows)?
                        .matmul(&self.slice(i, d.dtype())?)?;
                    sum = Some(match sum {
                        Some(s) => (s + part)?,
                        None => part,
                    });
                }
                sum.ok_or_else(|| candle_core::Error::Msg("an empty vocabulary matrix".into()))
            }
            Self::Quantized(q) => q.matmul(d),
        }
    }

    /// `h Wᵀ` for a dense matrix held in another dtype than `h`: each slice converted in turn.
    fn dense_by_slice_t(&self, h: &Tensor) -> Result<Tensor> {
        let parts = (0..self.slices().len())
            .map(|i| h.matmul(&self.slice(i, h.dtype())?.t()?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::testing::{max_rel_diff as max_diff, rand as random};

    fn rand(rows: usize, cols: usize, seed: u64) -> Tensor {
        random(&[rows, cols], seed, 1.0)
    }

    #[test]
    fn sliced_lookups_equal_the_dequantized_matrix() {
        let dev = Device::Cpu;
        // 45 rows in slices of 8: five full slices and a short one.
        let w = rand(45, 64, 1);
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let m = VocabMatrix::quantize(&w, dt, 8, &dev).unwrap();
            assert!(m.is_quantized());
            assert_eq!(m.slices().len(), 6);
            assert_eq!(m.slices()[5], (40, 5));
            assert!(m.bytes() < 45 * 64 * 4 / 3);
            // The whole matrix in one slice: the reference.
            let whole = VocabMatrix::quantize(&w, dt, 45, &dev).unwrap();
            let deq = whole.slice(0, DType::F32).unwrap();
            assert!(max_diff(&deq, &w) < 0.1);
            let ids = Tensor::new(&[44u32, 0, 7, 8, 44, 23, 39, 40], &dev).unwrap();
            let got = m.rows(&ids, DType::F32).unwrap();
            assert_eq!(max_diff(&got, &deq.index_select(&ids, 0).unwrap()), 0.0);
            let VocabMatrix::Quantized(q) = &m else {
                unreachable!()
            };
            let list = ids.to_vec1::<u32>().unwrap();
            let by_slice = m.rows_by_slice(q, &list, DType::F32, &dev).unwrap();
            assert_eq!(max_diff(&by_slice, &got), 0.0);
            // Slicing a quantized tensor as stored gives the same blocks.
            let q = QTensor::quantize(&w, dt).unwrap();
            let kept = VocabMatrix::from_quantized(&q, 8, &dev).unwrap();
            assert_eq!(max_diff(&kept.rows(&ids, DType::F32).unwrap(), &got), 0.0);
        }
        let bad = Tensor::new(&[45u32], &dev).unwrap();
        let m = VocabMatrix::quantize(&w, GgmlDType::Q8_0, 8, &dev).unwrap();
        assert!(m.rows(&bad, DType::F32).is_err());
        // Rows that do not fill whole blocks stay dense.
        let odd = rand(10, 48, 4);
        assert!(!VocabMatrix::quantize(&odd, GgmlDType::Q8_0, 8, &dev)
            .unwrap()
            .is_quantized());
    }

    /// A bf16 matrix computed in f32 goes slice by slice, each widened in turn: the same
    /// products as on the whole matrix widened at once.
    #[test]
    fn a_half_precision_matrix_is_widened_slice_by_slice() {
        let rows = 2 * SLICE_ROWS + 5;
        let w = rand(rows, 16, 7).to_dtype(DType::BF16).unwrap();
        let wide = w.to_dtype(DType::F32).unwrap();
        let m = VocabMatrix::Dense(w);
        assert_eq!(
            m.slices(),
            vec![
                (0, SLICE_ROWS),
                (SLICE_ROWS, SLICE_ROWS),
                (2 * SLICE_ROWS, 5)
            ]
        );
        assert_eq!(
            max_diff(
                &m.slice(2, DType::F32).unwrap(),
                &wide.narrow(0, 2 * SLICE_ROWS, 5).unwrap()
            ),
            0.0
        );
        let h = rand(3, 16, 8);
        let want = h.matmul(&wide.t().unwrap()).unwrap();
        assert!(max_diff(&m.matmul_t(&h).unwrap(), &want) < 1e-6);
        let d = rand(3, rows, 9);
        let want = d.matmul(&wide).unwrap();
        assert!(max_diff(&m.matmul(&d).unwrap(), &want) < 1e-5);
        // An f32 matrix stays one slice, used as held.
        assert_eq!(VocabMatrix::Dense(wide).slices(), vec![(0, rows)]);
    }
}
