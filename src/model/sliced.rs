//! A quantized `[rows, cols]` matrix held as consecutive slices of rows, each its own GGML
//! tensor, so that every product dequantizes one slice at a time: `x·Wᵀ` fills its output
//! columns slice by slice and `dY·W` sums over the slices. Results equal the dense computation
//! on the dequantized matrix, and the dense copy of the whole matrix never exists off the CPU.
//!
//! Why slices rather than one tensor: dequantizing a whole weight makes an f32 copy and, for a
//! bf16 model, a second one in bf16 (6 bytes a weight, 0.35 GB for one MLP weight of
//! Llama-8B); a slice of [`SLICE_BYTES`] keeps that transient at a few dozen MB. The blocks
//! are cut at load without dequantizing: GGML blocks never straddle rows.

use super::ops::row_chunks;
use crate::kernels::{qmatvec, qrows};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::borrow::Cow;

/// Outputs per row that [`QuantizedRows::matmul_t_refined`] computes again exactly.
pub const REFINED: usize = 16;

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
        let w = w.to_device(&Device::Cpu)?;
        Self::quantize_rows(rows, cols, dt, slice_rows, device, |s0, n| {
            w.narrow(0, s0, n)
        })
    }

    /// Quantizes a `[rows, cols]` matrix whose rows `read(start, n)` gives, one slice at a time,
    /// so no dense copy of the whole matrix is ever made (the load quantizes straight from the
    /// file this way); `None` when its rows do not fill whole blocks.
    pub fn quantize_rows<E: From<candle_core::Error>>(
        rows: usize,
        cols: usize,
        dt: GgmlDType,
        slice_rows: usize,
        device: &Device,
        mut read: impl FnMut(usize, usize) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Option<Self>, E> {
        if !cols.is_multiple_of(dt.block_size()) || slice_rows == 0 {
            return Ok(None);
        }
        let mut slices = vec![];
        for (s0, n) in row_chunks(rows, slice_rows) {
            let part = read(s0, n)?.to_dtype(DType::F32)?.flatten_all()?;
            // Fresh storage, never a view: candle's quantizer reads a view's whole storage.
            let part = Tensor::from_vec(part.to_vec1::<f32>()?, (n, cols), &Device::Cpu)?;
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
        for (s0, n) in row_chunks(rows, slice_rows) {
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
        row_chunks(self.rows, self.slice_rows).collect()
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
        if s.device().is_cpu() {
            let (rows, cols) = s.shape().dims2()?;
            let mut out = vec![0f32; rows * cols];
            if dequantize_parallel(s.dtype(), &s.data()?, &mut out) {
                return Tensor::from_vec(out, (rows, cols), &Device::Cpu)?.to_dtype(dtype);
            }
        }
        s.dequantize(&s.device())?.to_dtype(dtype)
    }

    /// The whole matrix dequantized to `dtype` (one dense copy, assembled slice by slice).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        if self.slices.len() == 1 {
            return self.slice(0, dtype);
        }
        if self.on_cpu() && dtype == DType::F32 {
            // Straight into one buffer: no second whole copy from a concatenation.
            let mut out = vec![0f32; self.rows * self.cols];
            for ((s0, n), s) in self.ranges().into_iter().zip(&self.slices) {
                let part = &mut out[s0 * self.cols..(s0 + n) * self.cols];
                if !dequantize_parallel(s.dtype(), &s.data()?, part) {
                    let d = s
                        .dequantize(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    part.copy_from_slice(&d);
                }
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

    /// [`QuantizedRows::matmul_t`] for decoding: the few rows of f32 `x` on the CPU that
    /// decoding gives are dotted with the blocks as they are stored, `x` rounded to 8 bits
    /// ([`qmatvec`], as llama.cpp does); anything else as `matmul_t`.
    pub fn matmul_t_decode(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.matmul_t_prompt(x)? {
            return Ok(y);
        }
        match self.matmul_t_few(x)? {
            Some(y) => Ok(y),
            None => self.matmul_t(x),
        }
    }

    /// Whether [`QuantizedRows::matmul_t_decode`] reads the blocks as stored for the rows of
    /// 2-D `x`: one new token's row, or a prompt's rows up to [`qrows::MAX_ROWS`] (exactly).
    pub fn reads_rows(&self, x: &Tensor) -> bool {
        match x.dims2() {
            Ok((n, _)) => n <= qmatvec::MAX_ROWS || self.prompt_rows(x).is_some(),
            Err(_) => false,
        }
    }

    /// The rows of `x` when they are a prompt's that [`qrows`] multiplies exactly: 2 to
    /// [`qrows::MAX_ROWS`] rows of f32 on the CPU, as wide as the matrix, in a format it reads.
    fn prompt_rows(&self, x: &Tensor) -> Option<usize> {
        let (n, cols) = x.dims2().ok()?;
        let ok = (2..=qrows::MAX_ROWS).contains(&n)
            && cols == self.cols
            && x.dtype() == DType::F32
            && x.device().is_cpu()
            && self.on_cpu()
            && qrows::covers(self.dtype())
            && crate::kernels::enabled();
        ok.then_some(n)
    }

    /// `x Wᵀ` for a prompt's rows, exactly, from the blocks as stored ([`qrows`]): the
    /// prompt's keys and values are the dequantized model's, where decoding's block path
    /// rounds `x`. `None` where it does not apply.
    fn matmul_t_prompt(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(n) = self.prompt_rows(x) else {
            return Ok(None);
        };
        let Some(parts) = self.parts_where(0, qrows::covers) else {
            return Ok(None);
        };
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * self.rows];
        for (w, at) in &parts {
            if !qrows::matmul_rows(w, &xs, n, &mut out, *at, self.rows) {
                return Ok(None);
            }
        }
        Ok(Some(Tensor::from_vec(out, (n, self.rows), x.device())?))
    }

    /// `x Wᵀ` for the few rows of f32 `x` on the CPU that decoding gives, from the blocks as
    /// stored: our block kernel for the formats it reads ([`qmatvec`]), candle's quantized
    /// matmul for the others (the k-quants of a Q4_K_M file; it rounds `x` to 8 bits as well).
    /// `None` where neither applies.
    fn matmul_t_few(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if let Some(y) = self.matmul_t_blocks(x)? {
            return Ok(Some(y));
        }
        self.matmul_t_ggml(x)
    }

    /// [`QuantizedRows::matmul_t_few`] by candle's quantized matmul, slice by slice.
    fn matmul_t_ggml(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.few_rows(x)?.is_none() || !self.on_cpu() {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let parts = self
            .slices
            .iter()
            .map(|s| x.apply_op1_no_bwd(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 1)?))
    }

    /// [`QuantizedRows::matmul_t_decode`] where the largest outputs decide (the LM head): on
    /// decoding's block path, x is rounded to 8 bits, and then the [`REFINED`] largest outputs
    /// of each row are computed again exactly from their dequantized weight rows, so the
    /// tokens in contention get the dense logits (the rounding moves a logit by about 0.1,
    /// never a token from far down into the lead). Without it, SmolLM2 Q4_1 answers
    /// "L'Étoile" rather than "Paris" for the capital of France, as llama.cpp does.
    pub fn matmul_t_refined(&self, x: &Tensor) -> Result<Tensor> {
        let Some(y) = self.matmul_t_few(x)? else {
            return self.matmul_t(x);
        };
        let (n, rows) = y.dims2()?;
        let mut yv = y.flatten_all()?.to_vec1::<f32>()?;
        let xv = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (j, xj) in xv.iter().enumerate() {
            self.refine_leading(xj, &mut yv[j * rows..(j + 1) * rows])?;
        }
        Tensor::from_vec(yv, (n, rows), x.device())
    }

    /// [`QuantizedRows::matmul_t_refined`] for one row `x` as a slice, every slice's blocks in
    /// one parallel dispatch (decoding's fused token step); `None` where the block path does
    /// not apply.
    pub fn matvec_refined(&self, x: &[f32]) -> Result<Option<Vec<f32>>> {
        let Some(parts) = self.block_parts(0) else {
            return Ok(None);
        };
        if x.len() != self.cols || !crate::kernels::enabled() {
            return Ok(None);
        }
        let xq = qmatvec::quantize_x(x, 1, self.cols);
        let mut out = vec![0f32; self.rows];
        if !qmatvec::qmatvec_parts(&parts, &xq, &mut out) {
            return Ok(None);
        }
        self.refine_leading(x, &mut out)?;
        Ok(Some(out))
    }

    /// Computes the [`REFINED`] largest of `out` (`x·Wᵀ` from the block path) again exactly,
    /// from their dequantized weight rows.
    fn refine_leading(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let mut dense_row = vec![0f32; self.cols];
        for r in leading(out, REFINED) {
            self.dequantize_row(r, &mut dense_row)?;
            out[r] = crate::kernels::dot(&dense_row, x);
        }
        Ok(())
    }

    /// Row `r` dequantized into `out` (`cols` values).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let i = r / self.slice_rows;
        let s = self.get(i)?;
        let local = r - i * self.slice_rows;
        let data = s.data()?;
        let row_bytes = data.len() / s.shape().dims2()?.0;
        let bytes = &data[local * row_bytes..(local + 1) * row_bytes];
        if dequantize_parallel(s.dtype(), bytes, out) {
            return Ok(());
        }
        let row = self
            .slice(i, DType::F32)?
            .narrow(0, local, 1)?
            .flatten_all()?;
        out.copy_from_slice(&row.to_vec1::<f32>()?);
        Ok(())
    }

    /// `x Wᵀ` straight from the blocks, for the few rows of f32 `x` on the CPU that decoding
    /// gives ([`qmatvec`]); None where it does not apply.
    fn matmul_t_blocks(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(n) = self.few_rows(x)? else {
            return Ok(None);
        };
        if !crate::kernels::enabled() {
            return Ok(None);
        }
        let cols = self.cols;
        let Some(parts) = self.block_parts(0) else {
            return Ok(None);
        };
        let xs = qmatvec::quantize_x(&x.flatten_all()?.to_vec1::<f32>()?, n, cols);
        let mut out = vec![0f32; n * self.rows];
        for (w, at) in &parts {
            if !qmatvec::qmatvec(w, &xs, n, &mut out[*at..], self.rows) {
                return Ok(None);
            }
        }
        Ok(Some(Tensor::from_vec(out, (n, self.rows), x.device())?))
    }

    /// The rows of `x` when it is what decoding's block products take: at most
    /// [`qmatvec::MAX_ROWS`] rows of f32 on the CPU, as wide as the matrix.
    fn few_rows(&self, x: &Tensor) -> Result<Option<usize>> {
        let (n, cols) = x.dims2()?;
        let few = n > 0
            && n <= qmatvec::MAX_ROWS
            && cols == self.cols
            && x.dtype() == DType::F32
            && x.device().is_cpu();
        Ok(few.then_some(n))
    }

    /// Each slice's GGML blocks with where its rows go in the product's output (`at` + its
    /// first row), for [`qmatvec`]; `None` off the CPU or for a block type it does not cover.
    pub fn block_parts(&self, at: usize) -> Option<Vec<(qmatvec::Blocks<'_>, usize)>> {
        self.parts_where(at, qmatvec::covers)
    }

    /// [`QuantizedRows::block_parts`] for a kernel that reads the formats `covers` accepts.
    fn parts_where(
        &self,
        at: usize,
        covers: fn(GgmlDType) -> bool,
    ) -> Option<Vec<(qmatvec::Blocks<'_>, usize)>> {
        if !self.on_cpu() || !covers(self.dtype()) {
            return None;
        }
        let ranges = self.ranges().into_iter().zip(&self.slices);
        ranges
            .map(|((s0, rows), s)| match s.data().ok()? {
                Cow::Borrowed(bytes) => Some((
                    qmatvec::Blocks {
                        dt: s.dtype(),
                        bytes,
                        rows,
                        cols: self.cols,
                    },
                    at + s0,
                )),
                Cow::Owned(_) => None,
            })
            .collect()
    }

    /// `d W` for 2-D `d` (`[n, rows]`): the input gradient of [`QuantizedRows::matmul_t`].
    pub fn matmul(&self, d: &Tensor) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (i, (s0, n)) in self.ranges().into_iter().enumerate() {
            let cols = d.narrow(1, s0, n)?;
            // GPU matmuls take contiguous operands only (candle's CUDA and Metal kernels
            // refuse a column-narrowed one); the CPU's reads it in place.
            let cols = if d.device().is_cpu() {
                cols
            } else {
                cols.contiguous()?
            };
            let part = cols.matmul(&self.slice(i, d.dtype())?)?;
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

/// Indices of the `k` largest values of `v` (NaNs never among them), in one pass: a sorted
/// list of the leaders so far, which a value enters only when it beats the last.
fn leading(v: &[f32], k: usize) -> Vec<usize> {
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (i, &x) in v.iter().enumerate() {
        if top.len() == k && top.last().is_none_or(|l| x <= l.0) || x.is_nan() {
            continue;
        }
        let at = top.partition_point(|l| l.0 >= x);
        top.insert(at, (x, i));
        top.truncate(k);
    }
    top.into_iter().map(|(_, i)| i).collect()
}

/// Dequantizes GGML blocks (`bytes`, as a CPU QTensor holds them) into `out`, in parallel over
/// the kernels' thread pool; false for a block type it does not cover (nothing written).
/// candle's own dequantization runs on one thread, which on a many-core machine makes a
/// quantized base's per-matmul dequantization cost more than the matmul.
pub fn dequantize_parallel(dt: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    use candle_core::quantized::k_quants::*;
    match dt {
        GgmlDType::Q4_0 => blocks::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => blocks::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => blocks::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => blocks::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(bytes, out),
        GgmlDType::Q2K => blocks::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => blocks::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => blocks::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => blocks::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => blocks::<BlockQ6K>(bytes, out),
        _ => false,
    }
}

fn blocks<T: candle_core::quantized::k_quants::GgmlType>(bytes: &[u8], out: &mut [f32]) -> bool {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    if bytes.len() != n * size
        || out.len() != n * T::BLCK_SIZE
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return false;
    }
    // SAFETY: the bytes are `n` whole blocks of `T` at `T`'s alignment (checked above), as the
    // `Vec<T>` behind a CPU QTensor holds them; GGML block types are plain `repr(C)` data.
    let xs: &[T] = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) };
    let p = crate::kernels::par::SendPtr::of(out);
    crate::kernels::par::for_chunks(n, n * T::BLCK_SIZE, |r| {
        // SAFETY: each chunk of blocks writes its own disjoint range of `out`.
        let ys = unsafe { p.slice(r.start * T::BLCK_SIZE, r.len() * T::BLCK_SIZE) };
        T::to_float(&xs[r], ys);
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's quantized matmul (decoding's path for the formats our block kernel does not
    /// read) equals our kernel where both read Q4_1: both round x to 8 bits per block of 32,
    /// candle keeping the block's scale and sum in f16 as llama.cpp does (ours in f32, hence
    /// the tolerance); slices are placed in order.
    #[test]
    fn candle_quantized_matmul_equals_the_block_kernel() {
        let w = crate::kernels::testing::rand(&[100, 64], 3, 1.0);
        let q = QuantizedRows::quantize(&w, GgmlDType::Q4_1, 32, &Device::Cpu)
            .unwrap()
            .unwrap();
        let x = crate::kernels::testing::rand(&[2, 64], 4, 1.0);
        let ours = q.matmul_t_blocks(&x).unwrap().unwrap();
        let candle = q.matmul_t_ggml(&x).unwrap().unwrap();
        assert_eq!(candle.dims(), &[2, 100]);
        let d = crate::kernels::testing::max_rel_diff(&ours, &candle);
        assert!(d < 1e-2, "{d}");
    }

    #[test]
    fn leading_finds_the_k_largest() {
        let v: Vec<f32> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 9973) as f32 - 5000.0)
            .chain([f32::NAN])
            .collect();
        for k in [1, 5, 16] {
            let mut want: Vec<usize> = (0..1000).collect();
            want.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
            want.truncate(k);
            assert_eq!(leading(&v, k), want);
        }
        assert_eq!(leading(&[1.0, 2.0], 16), vec![1, 0]);
    }
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
            // A prompt's rows: dequantized slices and the GEMM.
            let x = rand(&[12, 64], 2, 1.0);
            let want = x.matmul(&deq.t().unwrap()).unwrap();
            assert!(max_rel_diff(&m.matmul_t(&x).unwrap(), &want) < 1e-5);
            // A prompt read from the blocks for decoding: exact (to float rounding).
            let prompt = m.matmul_t_decode(&x).unwrap();
            assert!(m.reads_rows(&x));
            assert!(max_rel_diff(&prompt, &want) < 1e-5);
            // Decoding's few rows: the blocks read in integers, x rounded to 8 bits (the
            // kernel's own test bounds that rounding entry by entry); one new token's row
            // takes that path in `matmul_t_decode`.
            let x = x.narrow(0, 0, 3).unwrap();
            let want = x.matmul(&deq.t().unwrap()).unwrap();
            let got = m.matmul_t_few(&x).unwrap().unwrap();
            assert_eq!(max_rel_diff(&m.matmul_t(&x).unwrap(), &want), 0.0);
            assert!(max_rel_diff(&got, &want) < 2e-2);
            assert!(max_rel_diff(&got, &want) > 0.0, "the block path was taken");
            let one = m.matmul_t_decode(&x.narrow(0, 1, 1).unwrap()).unwrap();
            assert_eq!(max_rel_diff(&one, &got.narrow(0, 1, 1).unwrap()), 0.0);
            // The head's refinement: each row's largest outputs are the dense ones.
            let refined = m.matmul_t_refined(&x).unwrap().to_vec2::<f32>().unwrap();
            let (approx, dense) = (
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
            );
            for j in 0..3 {
                let mut order: Vec<usize> = (0..45).collect();
                order.sort_by(|a, b| approx[j][*b].total_cmp(&approx[j][*a]));
                for (rank, &r) in order.iter().enumerate() {
                    let tol = if rank < REFINED { 1e-5 } else { 2e-2 };
                    assert!((refined[j][r] - dense[j][r]).abs() <= tol * (1.0 + dense[j][r].abs()));
                }
                let argmax = |v: &[f32]| (0..v.len()).max_by(|a, b| v[*a].total_cmp(&v[*b]));
                assert_eq!(argmax(&refined[j]), argmax(&dense[j]));
            }
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
    fn parallel_dequantization_equals_candles() {
        let w = rand(&[64, 512], 5, 3.0);
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap();
            let mut got = vec![0f32; 64 * 512];
            assert!(
                dequantize_parallel(dt, &q.data().unwrap(), &mut got),
                "{dt:?}"
            );
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt:?}"
            );
            // A buffer of the wrong size is refused, not written past.
            assert!(!dequantize_parallel(dt, &q.data().unwrap(), &mut got[1..]));
        }
        assert!(!dequantize_parallel(
            GgmlDType::F16,
            &[0u8; 4],
            &mut [0f32; 2]
        ));
    }

    #[test]
    fn linear_slices_hold_sixteen_mib_of_f32() {
        assert_eq!(linear_slice_rows(4096), 1024);
        assert_eq!(linear_slice_rows(14336), 292);
        assert_eq!(linear_slice_rows(1 << 30), 1);
    }
}
