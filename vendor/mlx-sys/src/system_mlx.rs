//! Patched for mlx-sys's vendored copy (your_ai): building against a prebuilt MLX, such as the
//! `mlx` folder of the `mlx-cpu` (or `mlx-cuda-*`) Python wheel, on Linux.
//!
//! Opt-in: set `MLX_SYS_MLX_DIR` to that folder (it holds `lib/libmlx.so`, `include/mlx/` and
//! `share/cmake/MLX/MLXConfig.cmake`). Only mlx-c is built, with `MLX_C_USE_SYSTEM_MLX=ON` and
//! `CMAKE_PREFIX_PATH` pointing there; `mlxc` is linked statically, `mlx` as the wheel's shared
//! library, and the C++ runtime as `stdc++`. The library directory is published to dependents as
//! `DEP_MLX_RPATH` (a binary needs `-Wl,-rpath,<it>` to find `libmlx.so` at run time) and used
//! as an rpath for this crate's own tests and examples. A binary is tied to the exact MLX it was
//! linked against: another version fails at load with an undefined symbol.
//!
//! mlx-c's archive does not depend on the Cargo profile, so it is kept, per MLX version and
//! mlx-c source, beside the MLX folder (`<dir>/../mlx-c-build/<key>/libmlxc.a`) and reused by
//! every profile and checkout instead of being rebuilt (about four minutes on two cores). Where
//! that folder cannot be written, it stays in `OUT_DIR` only.
//!
//! macOS never takes this path: there the crate builds as upstream does.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

/// The environment variable that names the prebuilt MLX folder.
pub const ENV: &str = "MLX_SYS_MLX_DIR";

/// Changing this rebuilds every cached archive (a change to how mlx-c is configured).
const RECIPE: &str = "mlx-c static, MLX_C_USE_SYSTEM_MLX, Release, v1";

/// The prebuilt MLX folder, when this build uses one: `MLX_SYS_MLX_DIR` is set and the target
/// is not an Apple platform.
pub fn requested() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed={ENV}");
    let apple = env::var("CARGO_CFG_TARGET_VENDOR").is_ok_and(|v| v == "apple");
    let dir = env::var_os(ENV).filter(|d| !d.is_empty());
    match (apple, dir) {
        (true, Some(_)) => {
            println!("cargo:warning={ENV} is ignored on Apple platforms: MLX is built from source");
            None
        }
        (true, None) => None,
        (false, Some(dir)) => Some(PathBuf::from(dir)),
        // Upstream's build links macOS frameworks: it cannot work here.
        (false, None) => fail(format!("{ENV} is not set; off Apple platforms MLX is not built from source")),
    }
}

/// Fails the build with a message saying what is wrong and how to fix it.
fn fail(msg: String) -> ! {
    panic!(
        "\n\nmlx-sys: {msg}\n\
         {ENV} must name the `mlx` folder of the MLX wheel (for example the mlx-cpu==0.32.4 \
         wheel unpacked: <wheel>/mlx); your_ai's scripts/build_mlx.sh installs it.\n\n"
    )
}

/// MLX's version from its headers, as (major, minor, patch).
fn version(include: &Path) -> (u32, u32, u32) {
    let path = include.join("mlx/version.h");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", path.display())));
    let field = |name: &str| -> u32 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| fail(format!("{} does not define {name}", path.display())))
    };
    (
        field("MLX_VERSION_MAJOR"),
        field("MLX_VERSION_MINOR"),
        field("MLX_VERSION_PATCH"),
    )
}

/// FNV-1a over the mlx-c sources, the MLX folder and version, and the recipe: the archive's key.
fn key(mlx_c_root: &Path, dir: &Path, version: (u32, u32, u32)) -> String {
    let mut files = vec![mlx_c_root.join("CMakeLists.txt")];
    let mut stack = vec![mlx_c_root.join("mlx/c")];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("mlx-c sources are readable") {
            let p = entry.expect("mlx-c sources are readable").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut hash = 0xcbf29ce484222325_u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain([0u8].iter()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x100000001b3);
        }
    };
    eat(RECIPE.as_bytes());
    eat(format!("{version:?}").as_bytes());
    eat(dir.to_string_lossy().as_bytes());
    eat(env::var("CXX").unwrap_or_default().as_bytes());
    for f in files {
        println!("cargo:rerun-if-changed={}", f.display());
        eat(f.to_string_lossy().as_bytes());
        eat(&fs::read(&f).expect("mlx-c sources are readable"));
    }
    format!("{hash:016x}")
}

/// Builds mlx-c against the MLX in `dir` (or reuses the archive built before) and links it.
pub fn build_and_link(dir: &Path, mlx_c_root: &Path) {
    let dir = dir
        .canonicalize()
        .unwrap_or_else(|e| fail(format!("{} ({}): {e}", ENV, dir.display())));
    let lib = dir.join("lib");
    let include = dir.join("include");
    for needed in [
        lib.join("libmlx.so"),
        include.join("mlx/mlx.h"),
        dir.join("share/cmake/MLX/MLXConfig.cmake"),
    ] {
        if !needed.is_file() {
            fail(format!(
                "{} has no {}",
                dir.display(),
                needed.strip_prefix(&dir).unwrap_or(&needed).display()
            ));
        }
    }
    let version = version(&include);
    let key = key(mlx_c_root, &dir, version);
    let cache = dir
        .parent()
        .map(|p| p.join("mlx-c-build").join(&key))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"));
    let cached = cache.join("libmlxc.a");
    let cuda = is_cuda_build(&dir);
    let archive_dir = if cached.is_file() {
        cache
    } else {
        let mut config = cmake::Config::new(mlx_c_root);
        config
            .define("MLX_C_USE_SYSTEM_MLX", "ON")
            .define("CMAKE_PREFIX_PATH", &dir)
            .define("MLX_C_BUILD_EXAMPLES", "OFF")
            .define("BUILD_SHARED_LIBS", "OFF")
            .define("CMAKE_INSTALL_PREFIX", ".")
            .define("CMAKE_INSTALL_LIBDIR", "lib")
            .profile("Release");
        if cuda {
            cuda_stand_ins(&mut config);
        }
        let dst = config.build();
        // The install prefix "." is the build folder (as upstream's build has it).
        let built = dst.join("build").join("lib");
        if !built.join("libmlxc.a").is_file() {
            fail(format!(
                "the mlx-c build left no {}",
                built.join("libmlxc.a").display()
            ));
        }
        keep(&built.join("libmlxc.a"), &cache);
        built
    };
    println!("cargo:rustc-link-search=native={}", archive_dir.display());
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    if cuda {
        // libmlx.so needs the CUDA libraries (cuBLAS, cuDNN, NCCL, the driver's libcuda...),
        // which the machine that builds need not have: they are looked up at run time only.
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
        println!("cargo::metadata=cuda=1");
    }
    // This crate's own tests and examples; dependents read DEP_MLX_RPATH for theirs.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo::metadata=rpath={}", lib.display());

    let include_dirs = env::join_paths([include.clone(), mlx_c_root.to_path_buf()])
        .expect("MLX include directories must not contain the path-list separator");
    println!("cargo::metadata=include={}", include_dirs.display());
    println!(
        "cargo::metadata=version={}.{}.{}",
        version.0, version.1, version.2
    );
    println!("cargo::metadata=system=1");

    // mlx-rs seeds its random state with macOS's mach_approximate_time.
    println!("cargo:rerun-if-changed=src/shims.c");
    cc::Build::new()
        .file("src/shims.c")
        .warnings(true)
        .compile("mlx_sys_shims");
}

/// Whether the MLX in `dir` is a CUDA build (the `mlx-cuda-*` wheels): its `MLXConfig.cmake`
/// then requires the CUDA toolkit and cuDNN (`if(ON)` before `find_dependency(CUDAToolkit`;
/// the CPU wheel's has `if(OFF)`).
fn is_cuda_build(dir: &Path) -> bool {
    let config =
        fs::read_to_string(dir.join("share/cmake/MLX/MLXConfig.cmake")).unwrap_or_default();
    let mut enabled = false;
    for line in config.lines().map(str::trim) {
        if line.starts_with("if(") {
            enabled = line == "if(ON)";
        } else if line.starts_with("find_dependency(CUDAToolkit") {
            return enabled;
        }
    }
    false
}

/// mlx-c uses no CUDA itself: it only needs MLX's imported target, whose config asks for the
/// CUDA toolkit and cuDNN. Stand-in package configs (written to `OUT_DIR`) answer for them, so
/// that neither has to be installed where the binary is built.
fn cuda_stand_ins(config: &mut cmake::Config) {
    let shims = PathBuf::from(env::var("OUT_DIR").unwrap()).join("cuda-stand-ins");
    let files = [
        (
            "CUDAToolkitConfig.cmake",
            "if(NOT TARGET CUDA::cuda_driver)\n  add_library(CUDA::cuda_driver INTERFACE IMPORTED)\nendif()\n",
        ),
        ("CUDNNConfig.cmake", ""),
    ];
    for (name, text) in files {
        let written = fs::create_dir_all(&shims).and_then(|_| fs::write(shims.join(name), text));
        written
            .unwrap_or_else(|e| fail(format!("cannot write {}: {e}", shims.join(name).display())));
    }
    config
        .define("CMAKE_FIND_PACKAGE_PREFER_CONFIG", "ON")
        .define("CUDAToolkit_DIR", &shims)
        .define("CUDNN_DIR", &shims);
}

/// Copies the freshly built archive into the shared cache (through a temporary name, so a
/// concurrent build never sees half a file). Failing to is only a lost saving.
fn keep(archive: &Path, cache: &Path) {
    let tmp = cache.join(format!("libmlxc.a.{}.tmp", std::process::id()));
    let done = fs::create_dir_all(cache)
        .and_then(|_| fs::copy(archive, &tmp))
        .and_then(|_| fs::rename(&tmp, cache.join("libmlxc.a")));
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        println!(
            "cargo:warning=mlx-c's archive not cached in {} ({e}); it is rebuilt per profile",
            cache.display()
        );
    }
}
