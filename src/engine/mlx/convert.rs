//! Arrays across the seam: candle tensors on the host to MLX arrays and back (adapters,
//! optimizer moments, frozen weights at load), always through f32 on the host.

use super::MlxError;
use crate::error::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use mlx_rs::{Array, Dtype};

/// `t` (any dtype, any device) as an MLX array of dtype `dtype`.
pub fn to_array(t: &Tensor, dtype: Dtype) -> Result<Array> {
    let dims = t
        .dims()
        .iter()
        .map(|&d| i32::try_from(d).map_err(|_| too_large(t.dims())))
        .collect::<Result<Vec<i32>>>()?;
    let host = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    // Straight from the tensor's memory where it is contiguous f32 on the host (no host copy
    // beside MLX's); otherwise through one.
    let a = {
        let (storage, layout) = host.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => {
                Array::from_slice(&v[start..end], &dims)
            }
            _ => {
                drop(storage);
                Array::from_slice(&host.flatten_all()?.to_vec1::<f32>()?, &dims)
            }
        }
    };
    Ok(if dtype == Dtype::Float32 {
        a
    } else {
        a.as_dtype(dtype)?
    })
}

fn too_large(dims: &[usize]) -> crate::error::Error {
    MlxError(format!(
        "a tensor of shape {dims:?} is too large for MLX's 32-bit dimensions"
    ))
    .into()
}

/// `a` evaluated, as an f32 candle tensor on the host.
pub fn to_tensor(a: &Array) -> Result<Tensor> {
    let f = a.as_dtype(Dtype::Float32)?.contiguous()?;
    f.eval()?;
    let data = f
        .try_as_slice::<f32>()
        .map_err(|e| MlxError(format!("reading an array back: {e}")))?;
    let dims: Vec<usize> = f.shape().iter().map(|&d| d as usize).collect();
    Ok(Tensor::from_slice(data, dims, &Device::Cpu)?)
}

/// `a` (one element) evaluated, as a number on the host.
pub fn scalar(a: &Array) -> Result<f64> {
    let v = a
        .try_item_cast::<f32>()
        .map_err(|e| MlxError(format!("reading a scalar back: {e}")))?;
    Ok(v as f64)
}

/// A host slice of u32 as an MLX index array (i32 where the values fit: MLX's gathers take any
/// integer type, and i32 keeps Metal's fast paths).
pub fn indices(v: &[u32], shape: &[i32]) -> Array {
    let ints: Vec<i32> = v.iter().map(|&i| i as i32).collect();
    Array::from_slice(&ints, shape)
}
