//! A quantized `[rows, cols]` matrix held as consecutive slices of rows, each its own GGML
//! tensor, so that every product dequantizes one slice at a time: `x·Wᵀ` fills its output
//! columns slice by slice and `dY·W` sums over the slices. Results equal the dense computation
//! on the dequantized matrix, and the dense copy of the whole matrix never exists off the CPU.
//!
//! Why slices rather than one tensor: dequantizing a whole weight makes an f32 copy and, for a
//! bf16 model, a second one in bf16 (6 bytes a weight, 0.35 GB for one MLP weight of
//! Llama-8B); a slice of [`SLICE_BYTES`] keeps that transient at a few dozen MB. The blocks
//! are cut at load without dequantizing: GGML blocks never straddle rows.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::borrow::Cow;

/// Bytes of one dequantized (f32) slice of a linear weight.
pub const SLICE_BYTES: usize = 16 << 20;

/// Rows per slice of a linear weight with `cols` columns: [`SLICE_BYTES`] of f32.
pub fn linear_slice_rows(cols: usize) -> usize {
    (SLICE_BYTES / (cols * 4).max(1)).max(1)
}

#[derive(Debug)]
pub struct QuantizedRows {
    /// Consecutive row ranges of the matrix, `slice_rows` each (the last may be shorter).
    slices: Vec<QTensor>,
    slice_rows: usize,
    rows: usize,
    cols: usize,
}

impl QuantizedRows {
    /// Quantizes a dense `[rows, cols]` matrix to `dt` in slices of `slice_rows`; `None` when
    /// its rows do not fill whole blocks (it then stays dense).
    pub fn quantize(
        w: &Tensor,
        dt: GgmlDType,
        slice_rows: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        let (rows, cols) = w.dims2()?;
        if !cols.is_multiple_of(dt.block_size()) || slice_rows == 0 {
            return Ok(None);
        }
        let w = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let mut slices = vec![];
        for s0 in (0..rows).step_by(slice_rows) {
            // Fresh storage, not a view: candle's quantizer reads a view's whole storage.
            let n = slice_rows.min(rows - s0);
            let part = w.narrow(0, s0, n)?.flatten_all()?.to_vec1::<f32>()?;
            let part = Tensor::from_vec(part, (n, cols), &Device::Cpu)?;
            slices.push(if device.is_cpu() {
                QTensor::quantize(&part, dt)?
            } else {
                QTensor::quantize_onto(&part, dt, device)?
            });
        }
        Ok(Some(Self {
            slices,
            slice_rows,
            rows,
            cols,
        }))
    }

    /// Keeps an already quantized `[rows, cols]` tensor (a GGUF's own), cut into slices
    /// without dequantizing.
    pub fn from_qtensor(q: &QTensor, slice_rows: usize, device: &Device) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let dt = q.dtype();
        if !cols.is_multiple_of(dt.block_size()) || slice_rows == 0 {
            candle_core::bail!("cannot slice a {rows}x{cols} {dt:?} tensor by rows");
        }
        let row_bytes = cols / dt.block_size() * dt.type_size();
        let data = q.data()?;
        let mut slices = vec![];
        for s0 in (0..rows).step_by(slice_rows) {
            let n = slice_rows.min(rows - s0);
            let bytes = &data[s0 * row_bytes..(s0 + n) * row_bytes];
            slices.push(qtensor_from_ggml(dt, bytes, vec![n, cols], device)?);
        }
        Ok(Self {
            slices,
            slice_rows,
            rows,
            cols,
        })
    }

    /// `(rows, cols)`.
    pub fn dims2(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.slices.first().map_or(GgmlDType::F32, QTensor::dtype)
    }

    pub fn slice_rows(&self) -> usize {
        self.slice_rows
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.slices.iter().map(QTensor::storage_size_in_bytes).sum()
    }

    pub fn on_cpu(&self) -> bool {
        self.slices.iter().all(|s| s.device().is_cpu())
    }

    /// `(first row, rows)` of each slice.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        (0..self.rows)
            .step_by(self.slice_rows.max(1))
            .map(|s0| (s0, self.slice_rows.min(self.rows - s0)))
            .collect()
    }

    /// The GGML blocks of slice `i` (a copy off the CPU).
    pub fn slice_data(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        self.get(i)?.data()
    }

    fn get(&self, i: usize) -> Result<&QTensor> {
        self.slices
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no slice {i} of a quantized matrix")))
    }

    /// Slice `i` dequantized afresh to a dense `[rows, cols]` tensor in `dtype`.
    pub fn slice(&self, i: usize, dtype: DType) -> Result<Tensor> {
        let s = self.get(i)?;
        s.dequantize(&s.device())?.to_dtype(dtype)
    }

    /// The whole matrix dequantized to `dtype` (one dense copy, assembled slice by slice).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        if self.slices.len() == 1 {
            return self.slice(0, dtype);
        }
        if self.on_cpu() && dtype == DType::F32 {
            // Straight into one buffer: no second whole copy from a concatenation.
            let mut out = Vec::with_capacity(self.rows * self.cols);
            for s in &self.slices {
                out.extend(
                    s.dequantize(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            return Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu);
        }
        let parts = (0..self.slices.len())
            .map(|i| self.slice(i, dtype))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// `x Wᵀ` for 2-D `x`: `[n, rows]` in x's dtype.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.slices.len() == 1 {
            return x.matmul(&self.slice(0, x.dtype())?.t()?);
        }
        let parts = (0..self.slices.len())
            .map(|i| x.matmul(&self.slice(i, x.dtype())?.t()?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// `d W` for 2-D `d` (`[n, rows]`): the input gradient of [`QuantizedRows::matmul_t`].
    pub fn matmul(&self, d: &Tensor) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (i, (s0, n)) in self.ranges().into_iter().enumerate() {
            let part = d.narrow(1, s0, n)?.matmul(&self.slice(i, d.dtype())?)?;
            sum = Some(match sum {
                None => part,
                Some(acc) => (acc + part)?,
            });
        }
        match sum {
            Some(s) => Ok(s),
            None => Tensor::zeros((d.dim(0)?, self.cols), d.dtype(), d.device()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_rel_diff, rand};

    #[test]
    fn sliced_products_equal_the_dequantized_matrix() {
        let dev = Device::Cpu;
        // 45 rows in slices of 8: five full slices and a short one.
        let w = rand(&[45, 64], 1, 1.0);
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let m = QuantizedRows::quantize(&w, dt, 8, &dev).unwrap().unwrap();
            assert_eq!(m.ranges().len(), 6);
            assert_eq!(m.ranges()[5], (40, 5));
            assert!(m.bytes() < 45 * 64 * 4 / 3);
            // The whole matrix in one slice: the reference.
            let whole = QuantizedRows::quantize(&w, dt, 45, &dev).unwrap().unwrap();
            let deq = whole.dense(DType::F32).unwrap();
            assert!(max_rel_diff(&deq, &w) < 0.1);
            assert_eq!(max_rel_diff(&m.dense(DType::F32).unwrap(), &deq), 0.0);
            let x = rand(&[5, 64], 2, 1.0);
            let want = x.matmul(&deq.t().unwrap()).unwrap();
            assert!(max_rel_diff(&m.matmul_t(&x).unwrap(), &want) < 1e-5);
            let d = rand(&[5, 45], 3, 1.0);
            let want = d.matmul(&deq).unwrap();
            assert!(max_rel_diff(&m.matmul(&d).unwrap(), &want) < 1e-5);
            // Slicing a quantized tensor as stored gives the same blocks.
            let q = QTensor::quantize(&w, dt).unwrap();
            let kept = QuantizedRows::from_qtensor(&q, 8, &dev).unwrap();
            assert_eq!(max_rel_diff(&kept.dense(DType::F32).unwrap(), &deq), 0.0);
        }
        // Rows that do not fill whole blocks are not quantized.
        let odd = rand(&[10, 48], 4, 1.0);
        assert!(QuantizedRows::quantize(&odd, GgmlDType::Q8_0, 8, &dev)
            .unwrap()
            .is_none());
    }

    #[test]
    fn linear_slices_hold_sixteen_mib_of_f32() {
        assert_eq!(linear_slice_rows(4096), 1024);
        assert_eq!(linear_slice_rows(14336), 292);
        assert_eq!(linear_slice_rows(1 << 30), 1);
    }
}
