//! With the `mlx` feature on Linux, the binaries and tests find the prebuilt `libmlx.so` they
//! link at run time through an rpath to its folder (published by the vendored mlx-sys). Without
//! the feature, this does nothing.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MLX_RPATH");
    if std::env::var_os("CARGO_FEATURE_MLX").is_none() {
        return;
    }
    if let Ok(dir) = std::env::var("DEP_MLX_RPATH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
