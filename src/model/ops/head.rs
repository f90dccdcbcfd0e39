//! The LM head and its loss, written once for training and evaluation: final RMSNorm, the head
//! matrix and cross-entropy on the scored rows of the last hidden states, in chunks of
//! [`HEAD_CHUNK`] rows so the `[rows, vocab]` logits never exist whole; with a loss scale, also
//! the gradient, formed directly (`softmax − one-hot`) and taken back through the norm.
//!
//! The fused CPU kernel covers the loss with its gradient (training on the CPU in f32); the
//! loss alone (evaluation) and other devices and dtypes run candle's composite ops, the oracle
//! the kernel is tested against.

use super::rms_norm::{rms_norm, rms_norm_backward};
use super::row_chunks;
use crate::model::Llama;
use candle_core::{DType, Result, Tensor, D};

impl Llama {
    /// Applies the LM head to hidden states of any leading shape; result in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head_over(hidden, |h| self.lm_head.matmul_t(h))
    }

    /// [`Llama::logits`] for generation: a quantized head read from its blocks, the leading
    /// logits exact (`VocabMatrix::matmul_t_decode`).
    pub fn decode_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head_over(hidden, |h| self.lm_head.matmul_t_decode(h))
    }

    /// `product` over `hidden`'s rows, reshaped back to its leading shape, in f32.
    fn head_over(
        &self,
        hidden: &Tensor,
        product: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut dims = hidden.dims().to_vec();
        let hsz = dims.pop().unwrap_or(0);
        let rows: usize = dims.iter().product();
        let out = product(&hidden.reshape((rows, hsz))?)?.to_dtype(DType::F32)?;
        dims.push(self.cfg.vocab_size);
        out.reshape(dims)
    }
}

/// Scored rows per LM-head chunk: bounds the `[chunk, vocab]` logits held at once.
pub const HEAD_CHUNK: usize = 256;

/// Which tokens a row of `trained` flags scores: position `p ≥ 1` when it is trained and, with
/// `doc` (packed rows), in the same document as `p − 1`, whose hidden state predicts it.
pub fn scored<'a>(trained: &'a [bool], doc: Option<&'a [u32]>) -> impl Iterator<Item = usize> + 'a {
    (1..trained.len()).filter(move |&p| trained[p] && doc.is_none_or(|d| d[p] == d[p - 1]))
}

/// The scored rows of a batch's flattened `[B·T]` positions.
pub struct Targets<'a> {
    /// Rows whose next token is scored (u32, ascending).
    pub rows: &'a Tensor,
    /// The token each scored row must predict (u32).
    pub ids: &'a Tensor,
    /// Loss weight of each scored row (f32; 1 for plain training and evaluation).
    pub weights: &'a Tensor,
}

/// Losses of one batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossSums {
    /// Σ cross-entropy over scored tokens.
    pub ce: f64,
    /// Σ weight · cross-entropy (equal to `ce` for plain training).
    pub weighted: f64,
    /// Σ weight.
    pub weight: f64,
}

/// The loss sums over `targets` of the last hidden states `x` (`[B·T, H]`, before the final
/// norm); with `loss_scale`, also `∂(loss_scale · Σ wᵢ·CEᵢ)/∂x`.
pub fn head(
    model: &Llama,
    x: &Tensor,
    targets: &Targets,
    loss_scale: Option<f64>,
) -> Result<(LossSums, Option<Tensor>)> {
    let (ce, dx) = head_rows(model, x, targets, loss_scale)?;
    let weights = targets.weights.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut sums = LossSums::default();
    for (&c, &w) in ce.iter().zip(&weights) {
        sums.ce += c;
        sums.weighted += c * w as f64;
        sums.weight += w as f64;
    }
    Ok((sums, dx))
}

/// [`head`] with the cross-entropy of each scored row, in `targets` order (the preference
/// objectives sum them per answer).
pub fn head_rows(
    model: &Llama,
    x: &Tensor,
    targets: &Targets,
    loss_scale: Option<f64>,
) -> Result<(Vec<f64>, Option<Tensor>)> {
    let eps = model.cfg.rms_norm_eps;
    let mut ce_parts = Vec::new();
    let mut dx_rows = vec![];
    let n = targets.rows.dim(0)?;
    let xs = x.index_select(targets.rows, 0)?;
    let ids = targets.ids.to_vec1::<u32>()?;
    let weights = targets.weights.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    for (start, len) in row_chunks(n, HEAD_CHUNK) {
        let xc = xs.narrow(0, start, len)?;
        let h = rms_norm(&xc, &model.norm, eps as f32)?;
        let (tg, wc) = (&ids[start..start + len], &weights[start..start + len]);
        // The fused kernel where it covers the chunk, with or without the gradient: a score
        // without one is then the training step's to the bit.
        let dh = match fused_chunk(model, &h, tg, wc, loss_scale) {
            Some(done) => {
                let (ce, dh) = done?;
                ce_parts.push(ChunkCe::Read(ce));
                dh
            }
            None => {
                let tgt = targets.ids.narrow(0, start, len)?.unsqueeze(1)?;
                let w = targets.weights.narrow(0, start, len)?;
                let (ce, dh) = composite_chunk(model, &h, &tgt, &w, loss_scale)?;
                ce_parts.push(ChunkCe::Computed(ce));
                dh
            }
        };
        drop(h);
        if let Some(dh) = dh {
            dx_rows.push(rms_norm_backward(&xc, &model.norm, &dh, eps)?);
        }
    }
    let ce_rows = read_back(ce_parts)?;
    let Some(_) = loss_scale else {
        return Ok((ce_rows, None));
    };
    let dx = x.zeros_like()?;
    let dx = if dx_rows.is_empty() {
        dx
    } else {
        dx.index_add(targets.rows, &Tensor::cat(&dx_rows, 0)?, 0)?
    };
    Ok((ce_rows, Some(dx)))
}

/// One chunk's cross-entropies and, with `loss_scale`, `∂/∂h` by the fused kernel, for
/// normed hidden states `h`: `None` where it does not cover them.
fn fused_chunk(
    model: &Llama,
    h: &Tensor,
    targets: &[u32],
    weights: &[f32],
    loss_scale: Option<f64>,
) -> Option<Result<(Vec<f32>, Option<Tensor>)>> {
    let coef: Option<Vec<f32>> =
        loss_scale.map(|s| weights.iter().map(|&w| (w as f64 * s) as f32).collect());
    let head = &model.lm_head;
    crate::kernels::cross_entropy_head_sliced(
        h,
        &head.slices(),
        |i| head.slice(i, DType::F32),
        targets,
        coef.as_deref(),
    )
}

/// One chunk with candle's ops: the chunk's cross-entropies and, with `loss_scale`, `∂/∂h` for
/// normed hidden states `h`, targets `tgt` (`[len, 1]`) and loss weights `w`.
fn composite_chunk(
    model: &Llama,
    h: &Tensor,
    tgt: &Tensor,
    w: &Tensor,
    loss_scale: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    // The loss is accumulated in f32 at least (f64 when the model runs in f64, as tests do).
    let acc = if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let len = h.dim(0)?;
    // Each `[chunk, vocab]` temporary is dropped as soon as the next one exists: at most
    // two are alive at once.
    let shifted = {
        let logits = model.lm_head.matmul_t(h)?.to_dtype(acc)?;
        let max = logits.max_keepdim(D::Minus1)?;
        logits.broadcast_sub(&max)?
    };
    let w = w.to_dtype(acc)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let ce = (sum.log()? - shifted.gather(tgt, D::Minus1)?)?.squeeze(1)?;
    drop(shifted);
    let Some(loss_scale) = loss_scale else {
        return Ok((ce, None));
    };
    // d(w·CE)/dlogits = w · (softmax − one-hot).
    let probs = exp.broadcast_div(&sum)?;
    drop(exp);
    let minus_one = Tensor::full(-1f32, (len, 1), probs.device())?.to_dtype(acc)?;
    let dlogits = probs.scatter_add(tgt, &minus_one, 1)?;
    drop(probs);
    let dlogits = dlogits.broadcast_mul(&(w * loss_scale)?.unsqueeze(1)?)?;
    Ok((
        ce,
        Some(model.lm_head.matmul(&dlogits.to_dtype(model.dtype)?)?),
    ))
}

/// A head chunk's cross-entropies: read by the fused kernel, or still on the device.
enum ChunkCe {
    Read(Vec<f32>),
    Computed(Tensor),
}

/// All chunks' cross-entropies in order, the device's read back in one transfer (one host
/// sync a head, not one a chunk), in the dtype computed: no f64 on the device, which Metal
/// lacks; f32 → f64 on the host is exact.
fn read_back(parts: Vec<ChunkCe>) -> Result<Vec<f64>> {
    let computed: Vec<&Tensor> = parts
        .iter()
        .filter_map(|p| match p {
            ChunkCe::Computed(t) => Some(t),
            ChunkCe::Read(_) => None,
        })
        .collect();
    let mut device = match computed.as_slice() {
        [] => vec![],
        all => {
            let ce = Tensor::cat(all, 0)?;
            match ce.dtype() {
                DType::F64 => ce.to_vec1::<f64>()?,
                _ => ce
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f64::from)
                    .collect(),
            }
        }
    }
    .into_iter();
    let mut out = vec![];
    for p in &parts {
        match p {
            ChunkCe::Read(ce) => out.extend(ce.iter().map(|&c| f64::from(c))),
            ChunkCe::Computed(t) => out.extend(device.by_ref().take(t.dim(0)?)),
        }
    }
    Ok(out)
}
