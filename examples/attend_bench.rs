//! Decoding's attention over a KV cache held in f32 and in f16 (`--kv-cache`), at SmolLM2's
//! and Llama-3.1-8B's head shapes and several cache lengths: microseconds per token for one
//! block, and the cache's bytes per block.
//!
//!     cargo run --release --example attend_bench
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!(
        "{:>10} {:>6} {:>10} {:>10} {:>8} {:>10}",
        "model", "len", "f32 us", "f16 us", "f16/f32", "f16 MiB"
    );
    for (name, nh, nkv, d) in [("SmolLM2", 9, 3, 64), ("Llama-8B", 32, 8, 128)] {
        for len in [512, 2048, 8192] {
            let q = Tensor::randn(0f32, 1., (1, nh, 1, d), &dev)?;
            let k = Tensor::randn(0f32, 1., (1, nkv, len, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (1, nkv, len, d), &dev)?;
            let mut us = [0f64; 2];
            for (i, dt) in [DType::F32, DType::F16].into_iter().enumerate() {
                let (k, v) = (k.to_dtype(dt)?, v.to_dtype(dt)?);
                let run =
                    || your_ai::kernels::attend_cached(&q, &k, &v, len, nkv).expect("covered");
                run()?;
                let n = (2_000_000 / len).max(20);
                let t = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(run()?);
                }
                us[i] = t.elapsed().as_secs_f64() / n as f64 * 1e6;
            }
            let mib = (2 * nkv * len * d * 2) as f64 / (1 << 20) as f64;
            println!(
                "{name:>10} {len:>6} {:>10.1} {:>10.1} {:>8.2} {mib:>10.1}",
                us[0],
                us[1],
                us[1] / us[0]
            );
        }
    }
    Ok(())
}
