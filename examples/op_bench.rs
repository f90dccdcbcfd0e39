use candle_core::{Device, Tensor, D};
use std::time::Instant;
fn t(name: &str, f: &mut dyn FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let n = 50;
    let c = Instant::now();
    for _ in 0..n {
        std::hint::black_box(f()?);
    }
    let s = c.elapsed().as_secs_f64() / n as f64;
    println!("{name:30} {:8.1} us", s * 1e6);
    Ok(s)
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let rows = 220;
    let h = 576;
    let i = 1536;
    let r = 8;
    let x = Tensor::randn(0f32, 1., (rows, h), &dev)?;
    let xi = Tensor::randn(0f32, 1., (rows, i), &dev)?;
    let wq = Tensor::randn(0f32, 1., (h, h), &dev)?;
    let wg = Tensor::randn(0f32, 1., (i, h), &dev)?;
    let wd = Tensor::randn(0f32, 1., (h, i), &dev)?;
    let a = Tensor::randn(0f32, 1., (r, h), &dev)?;
    let b = Tensor::randn(0f32, 1., (i, r), &dev)?;
    let nw = Tensor::ones(h, candle_core::DType::F32, &dev)?;
    t("x·Wqᵀ", &mut || x.matmul(&wq.t()?))?;
    t("x·Wgᵀ", &mut || x.matmul(&wg.t()?))?;
    t("xi·Wdᵀ", &mut || xi.matmul(&wd.t()?))?;
    t("x·Aᵀ", &mut || x.matmul(&a.t()?))?;
    let xa = x.matmul(&a.t()?)?;
    t("xa·Bᵀ", &mut || xa.matmul(&b.t()?))?;
    t("(xa·Bᵀ)*2", &mut || xa.matmul(&b.t()?)? * 2.0)?;
    let g = x.matmul(&wg.t()?)?;
    t("g+g", &mut || &g + &g)?;
    t("g*g", &mut || &g * &g)?;
    t("silu(g)", &mut || candle_nn::ops::silu(&g))?;
    t("sigmoid(g)", &mut || candle_nn::ops::sigmoid(&g))?;
    t("g*2.0", &mut || &g * 2.0)?;
    t("rms_norm", &mut || candle_nn::ops::rms_norm(&x, &nw, 1e-5))?;
    t("x.sqr.mean_keepdim", &mut || {
        x.sqr()?.mean_keepdim(D::Minus1)
    })?;
    t("x bcast_mul nw", &mut || x.broadcast_mul(&nw))?;
    let q = x.reshape((4, 55, 9, 64))?;
    t("heads transpose contiguous", &mut || {
        q.transpose(1, 2)?.contiguous()
    })?;
    let s = Tensor::randn(0f32, 1., (4, 3, 165, 55), &dev)?;
    t("softmax [4,3,165,55]", &mut || {
        candle_nn::ops::softmax_last_dim(&s)
    })?;
    t("zeros g", &mut || g.zeros_like())?;
    Ok(())
}
