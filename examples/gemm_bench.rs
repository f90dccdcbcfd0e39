//! GEMM throughput of the shapes a SmolLM2 training step runs, in GFLOP/s:
//! `cargo run --release --example gemm_bench [rows]`.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dev = Device::Cpu;
    let shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)];
    let mut total_flops = 0.0;
    let mut total_s = 0.0;
    for (inp, out) in shapes {
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (rows, out), &dev)?;
        let wt = w.t()?;
        for (name, f) in [
            (
                "x·Wᵀ ",
                Box::new(|| x.matmul(&wt)) as Box<dyn Fn() -> candle_core::Result<Tensor>>,
            ),
            ("dY·W ", Box::new(|| dy.matmul(&w))),
        ] {
            f()?;
            let n = 20;
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(f()?);
            }
            let s = t.elapsed().as_secs_f64() / n as f64;
            let flops = 2.0 * (rows * inp * out) as f64;
            total_flops += flops;
            total_s += s;
            println!(
                "{name} [{rows}x{inp}]·[{inp}x{out}]: {:7.3} ms  {:6.1} GFLOP/s",
                s * 1e3,
                flops / s / 1e9
            );
        }
    }
    println!("all: {:.1} GFLOP/s", total_flops / total_s / 1e9);
    Ok(())
}
