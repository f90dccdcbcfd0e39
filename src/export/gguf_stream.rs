//! A GGUF writer that takes the tensors one at a time.
//!
//! candle's `gguf_file::write` wants every tensor at once, which for a merged 8B model in f16
//! is 16 GB held in memory before the first byte is written. A GGUF header only needs each
//! tensor's name, shape and type (its offset follows from the sizes before it), so this
//! writer lays out the header from a plan and then asks for each tensor's data in turn: the
//! fuse holds one merged, quantized tensor at a time.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use std::io::Write;

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
const VERSION: u32 = 3;
const ALIGNMENT: usize = 32;

/// One tensor of the file, before its data exists.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    /// Row-major dimensions (`[out, in]` for a weight), as candle gives them.
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorPlan {
    /// Bytes of the tensor's data: whole blocks along its rows.
    pub fn bytes(&self) -> Result<usize> {
        let elems: usize = self.dims.iter().product();
        let block = self.dtype.block_size();
        if !self.dims.last().copied().unwrap_or(0).is_multiple_of(block) {
            return Err(Error::Export(format!(
                "tensor {} ({:?}): rows of {} do not fill {:?} blocks of {block}",
                self.name,
                self.dims,
                self.dims.last().copied().unwrap_or(0),
                self.dtype
            )));
        }
        Ok(elems / block * self.dtype.type_size())
    }
}

/// The type number GGUF stores for `dt` (ggml's `enum ggml_type`).
fn type_id(dt: GgmlDType) -> u32 {
    match dt {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The type number of a metadata value (`enum gguf_type`).
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // GGUF arrays hold one element type; an empty one may name any.
            let ty = items.first().map_or(4, value_type_id);
            if items.iter().any(|i| value_type_id(i) != ty) {
                return Err(Error::Export(format!(
                    "metadata {key}: an array mixes value types"
                )));
            }
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, key, i)?;
            }
        }
    }
    Ok(())
}

fn padding(len: usize) -> usize {
    len.next_multiple_of(ALIGNMENT) - len
}

/// The header, metadata and tensor directory for `plan`, padded to the data's alignment.
fn header(meta: &[(String, Value)], plan: &[TensorPlan]) -> Result<Vec<u8>> {
    let mut out = vec![];
    out.extend(MAGIC.to_le_bytes());
    out.extend(VERSION.to_le_bytes());
    out.extend((plan.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        out.extend(value_type_id(v).to_le_bytes());
        put_value(&mut out, k, v)?;
    }
    let mut offset = 0usize;
    for t in plan {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        // GGUF lists dimensions fastest-varying first.
        for &d in t.dims.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(type_id(t.dtype).to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        let bytes = t.bytes()?;
        offset += bytes + padding(bytes);
    }
    out.resize(out.len() + padding(out.len()), 0);
    Ok(out)
}

/// Writes a GGUF with `meta` and the tensors of `plan` to `w`, calling `tensor(i)` for the
/// data of `plan[i]` in order; each tensor is written and dropped before the next is made.
pub fn write(
    w: &mut impl Write,
    meta: &[(String, Value)],
    plan: &[TensorPlan],
    mut tensor: impl FnMut(usize) -> Result<QTensor>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::Export(format!("cannot write the GGUF: {e}"));
    w.write_all(&header(meta, plan)?).map_err(io)?;
    for (i, t) in plan.iter().enumerate() {
        let q = tensor(i)?;
        if q.dtype() != t.dtype || q.shape().dims() != t.dims.as_slice() {
            return Err(Error::Export(format!(
                "tensor {}: made as {:?} {:?}, planned as {:?} {:?}",
                t.name,
                q.dtype(),
                q.shape().dims(),
                t.dtype,
                t.dims
            )));
        }
        let data = q
            .data()
            .map_err(|e| Error::Export(format!("tensor {}: {e}", t.name)))?;
        if data.len() != t.bytes()? {
            return Err(Error::Export(format!(
                "tensor {}: {} bytes, planned {}",
                t.name,
                data.len(),
                t.bytes()?
            )));
        }
        w.write_all(&data).map_err(io)?;
        w.write_all(&vec![0u8; padding(data.len())]).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use candle_core::{Device, Tensor};

    #[test]
    fn candle_reads_back_what_is_streamed() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 64.0 * 3.0, &dev)
            .unwrap()
            .reshape((3, 64))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0, 3.25], &dev).unwrap();
        let tensors = [
            QTensor::quantize(&a, GgmlDType::Q8_0).unwrap(),
            QTensor::quantize(&b, GgmlDType::F32).unwrap(),
            QTensor::quantize(&a, GgmlDType::F16).unwrap(),
        ];
        let plan: Vec<TensorPlan> = ["a.q8", "b", "a.f16"]
            .iter()
            .zip(&tensors)
            .map(|(n, q)| TensorPlan {
                name: n.to_string(),
                dims: q.shape().dims().to_vec(),
                dtype: q.dtype(),
            })
            .collect();
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("x.count".to_string(), Value::U32(7)),
            ("x.scale".to_string(), Value::F32(0.5)),
            (
                "x.list".to_string(),
                Value::Array(vec![Value::String("p".into()), Value::String("qr".into())]),
            ),
            ("x.empty".to_string(), Value::Array(vec![])),
        ];
        let mut made = vec![];
        let mut buf = vec![];
        write(&mut buf, &meta, &plan, |i| {
            made.push(i);
            Ok(QTensor::quantize(&[&a, &b, &a][i].clone(), tensors[i].dtype()).unwrap())
        })
        .unwrap();
        assert_eq!(made, [0, 1, 2]);
        let mut cur = std::io::Cursor::new(buf);
        let content = Content::read(&mut cur).unwrap();
        assert_eq!(content.metadata["x.count"].to_u32().unwrap(), 7);
        assert_eq!(content.metadata["x.scale"].to_f32().unwrap(), 0.5);
        assert_eq!(content.metadata["x.list"].to_vec().unwrap().len(), 2);
        for (i, name) in ["a.q8", "b", "a.f16"].iter().enumerate() {
            let got = content.tensor(&mut cur, name, &dev).unwrap();
            assert_eq!(got.dtype(), tensors[i].dtype());
            assert_eq!(got.data().unwrap(), tensors[i].data().unwrap());
        }
        // A tensor that does not match its plan is refused.
        let err = write(&mut vec![], &meta, &plan[..1], |_| {
            Ok(QTensor::quantize(&a, GgmlDType::F16).unwrap())
        })
        .unwrap_err();
        assert!(err.to_string().contains("planned as"), "{err}");
    }
}
