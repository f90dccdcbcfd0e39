//! With the `mlx` feature on Linux, the binaries and tests find the prebuilt `libmlx.so` they
//! link at run time through an rpath to its folder (published by the vendored mlx-sys). Without
//! the feature, this does nothing.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mlx_cuda)");
    println!("cargo:rerun-if-env-changed=DEP_MLX_RPATH");
    println!("cargo:rerun-if-env-changed=DEP_MLX_CUDA");
    if std::env::var_os("CARGO_FEATURE_MLX").is_none() {
        return;
    }
    if let Ok(dir) = std::env::var("DEP_MLX_RPATH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    // A CUDA build of MLX (the mlx-cuda wheels): the CUDA libraries libmlx.so needs are only
    // looked up at run time, so the machine that builds need not have them.
    // `cfg(mlx_cuda)` tells the engine it has that MLX, which computes nothing (not even on the
    // CPU) without an NVIDIA GPU and driver.
    if std::env::var_os("DEP_MLX_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
        println!("cargo:rustc-cfg=mlx_cuda");
    }
}
