#!/usr/bin/env bash
# Builds a CUDA release binary (`--features cuda`) on a machine without the CUDA toolkit or a
# GPU, with NVIDIA's CUDA 13.0 toolchain from the Python package index (nvcc, headers, cuBLAS,
# cuRAND, NVRTC) installed into a cache directory. On a machine that has the toolkit,
# `cargo build --release --features cuda` is all it takes.
#
# The binary runs where the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries are
# installed (a toolkit, or PyTorch's cu13 wheels): put their directory on LD_LIBRARY_PATH.
# libcuda comes from the driver at run time; here the link uses a stub of its symbols. Such a
# binary needs libcuda.so.1 to start at all, also for `--device cpu`.
#
#   CUDA_COMPUTE_CAP  compute capability the kernels are built for (default 90: H100/H200)
#   YOUR_AI_CUDA_ENV  where the toolchain goes (default: ~/.cache/your_ai/cuda-13.0)
#   CARGO_TARGET_DIR  build directory (default: target-cuda)
# Prints the binary's path; it is built without debug info and stripped (about 63 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

env="${YOUR_AI_CUDA_ENV:-$HOME/.cache/your_ai/cuda-13.0}"
[ -x "$env/bin/pip" ] || python3 -m venv "$env"
# One CUDA release throughout: nvcc's PTX must be one the libraries and cudarc know.
"$env/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 >&2
cuda=$(echo "$env"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cuda/bin/nvcc" ] || { echo "error: no nvcc under $cuda" >&2; exit 1; }

# The linker wants unversioned names, and a libcuda to resolve the driver API against.
link="$env/link"
mkdir -p "$link"
for lib in cudart nvrtc cublas cublasLt curand; do
  so=$(ls "$cuda/lib/lib$lib.so."* 2>/dev/null | grep -E "lib$lib\.so\.[0-9]+$" | head -1) ||
    true
  [ -n "$so" ] || { echo "error: lib$lib.so.* not found under $cuda/lib" >&2; exit 1; }
  ln -sf "$so" "$link/lib$lib.so"
done
cargo fetch --quiet
cudarc=$(cargo metadata --format-version 1 --features cuda |
  python3 -c 'import json,sys,os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
stub="$link/cuda_stub.c"
grep -ohE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$cudarc/src/driver/sys/mod.rs" |
  awk '{print "void " $NF "(void) {}"}' | sort -u >"$stub"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$stub"

export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
export CARGO_PROFILE_RELEASE_DEBUG=0
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link"
cargo build --release --features cuda --quiet
bin="$CARGO_TARGET_DIR/release/your_ai"
strip "$bin"
echo "$bin"
