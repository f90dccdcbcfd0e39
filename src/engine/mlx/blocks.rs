//! GGML blocks mapped onto MLX's affine quantization without a round trip through dense
//! weights. Both store a weight as `scale · q + bias` per group of 32 consecutive inputs:
//! Q4_1 is `d·q + m` (q in 0..15), Q4_0 is `d·(q − 8)`, Q8_0 is `d·q` (q in −128..127, stored
//! here as q + 128 with bias −128·d). So the MLX weight holds exactly the values the GGUF
//! holds, where dequantizing and quantizing again would round a block whose q does not span
//! the whole range onto a new grid (and make a dense f32 copy of each weight on the way).

use crate::model::sliced::QuantizedRows;
use candle_core::quantized::GgmlDType;
use half::f16;
use mlx_rs::{Array, Dtype};

/// MLX's `(w, scales, biases)` for `q` in `dtype`, and their width (the blocks' own: a
/// quantized GGUF keeps its values whatever `--quantize` asks), or `None` where the formats do
/// not agree block for block.
pub fn map(
    q: &QuantizedRows,
    dtype: Dtype,
) -> crate::error::Result<Option<(Array, Array, Array, i32)>> {
    let dt = q.dtype();
    let (bb, per_word, bits) = match dt {
        GgmlDType::Q4_1 => (20, 8, 4),
        GgmlDType::Q4_0 => (18, 8, 4),
        GgmlDType::Q8_0 => (34, 4, 8),
        _ => return Ok(None),
    };
    let (rows, cols) = q.dims2();
    if cols % 32 != 0 {
        return Ok(None);
    }
    let groups = rows * cols / 32;
    let mut words: Vec<u32> = Vec::with_capacity(rows * cols / per_word);
    let (mut scales, mut biases) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    for i in 0..q.ranges().len() {
        let data = q.slice_data(i)?;
        for b in data.chunks_exact(bb) {
            let half = |at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
            let d = half(0);
            let mut vals = [0u8; 32];
            match dt {
                GgmlDType::Q8_0 => {
                    for (v, &x) in vals.iter_mut().zip(&b[2..34]) {
                        *v = (x as i8 as i16 + 128) as u8;
                    }
                    scales.push(d);
                    biases.push(-128.0 * d);
                }
                _ => {
                    let qs = if dt == GgmlDType::Q4_1 {
                        &b[4..20]
                    } else {
                        &b[2..18]
                    };
                    for (j, &x) in qs.iter().enumerate() {
                        vals[j] = x & 15;
                        vals[j + 16] = x >> 4;
                    }
                    scales.push(d);
                    biases.push(if dt == GgmlDType::Q4_1 {
                        half(2)
                    } else {
                        -8.0 * d
                    });
                }
            }
            // MLX packs each uint32 from its lowest bits up, element after element.
            let width = 32 / per_word;
            for chunk in vals.chunks_exact(per_word) {
                let mut w = 0u32;
                for (k, &v) in chunk.iter().enumerate() {
                    w |= (v as u32) << (width * k);
                }
                words.push(w);
            }
        }
    }
    let (r, c) = (rows as i32, cols as i32);
    let w = Array::from_slice(&words, &[r, c * bits / 32]);
    let g = |v: &[f32]| Array::from_slice(v, &[r, c / 32]).as_dtype(dtype);
    Ok(Some((w, g(&scales)?, g(&biases)?, bits)))
}
