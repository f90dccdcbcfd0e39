#!/usr/bin/env bash
# Builds the MLX-enabled release binary (`cargo build --release --features mlx`) and prints its
# path on the last line. Idempotent: a second run only checks what is there.
#
# On Linux MLX comes prebuilt from the pinned mlx-cpu wheel of the Python package index,
# unpacked into a cache outside the repository; the vendored mlx-sys builds mlx-c against it
# (vendor/mlx-sys/PATCHES.md). What the build needs is installed when missing: cmake, libclang
# (for bindgen), a C++ compiler and OpenBLAS through apt-get, the wheel through pip. On macOS MLX is built
# from source with Metal, as upstream does, and nothing is installed.
#
#   --setup         install what the build needs, build nothing; print the MLX folder to set
#                   as MLX_SYS_MLX_DIR (scripts/test.sh uses this)
#   --cuda          link MLX's CUDA backend instead: the pinned mlx-cuda-13 wheel (~90 MB), for
#                   `--device cuda --engine mlx`; built into target-mlx-cuda (or CARGO_TARGET_DIR)
#                   without debug info, and stripped. Neither the CUDA toolkit nor a GPU is
#                   needed here; see "Running a --cuda binary" below
#   YOUR_AI_CACHE   cache directory (default: ~/.cache/your_ai)
#
# Running a --cuda binary: it needs, at run time, the wheel's mlx/ and mlx_cuda_13.libs/ folders
# side by side (libmlx.so loads its reference BLAS from the latter), the NVIDIA driver's
# libcuda.so.1, and the CUDA 13 libraries of the wheel's requirements (cuBLAS, cuFFT, cuSOLVER,
# NVRTC, cuDNN 9, NCCL, the CUDA runtime), as the pip packages that PyTorch's cu13 wheels also
# install. libmlx.so looks for those in ../../nvidia/{cu13,cudnn,nccl}/lib from its folder, as
# in a site-packages; its NVRTC kernels want the CUDA headers of ../../nvidia/cu13/include, or
# CUDA_HOME/include. Put the folder of libmlx.so on LD_LIBRARY_PATH (the binary's rpath names
# this machine's cache), and a link `nvidia` beside mlx/ to site-packages/nvidia; or put the
# nvidia lib folders on LD_LIBRARY_PATH too and set CUDA_HOME. libmlx.so is 146 MB, 67 MB of it
# device code for sm_75, sm_80, sm_90a, sm_100a, sm_120a, sm_121a (and compute_120 PTX).
set -euo pipefail
cd "$(dirname "$0")/.."

mlx_version=0.32.4
# sha256 of mlx_cpu-0.32.4-py3-none-manylinux_2_35_x86_64.whl: a binary is tied to the exact MLX
# it links (any other fails at load with an undefined symbol), so the wheel is pinned.
wheel_sha_x86_64=0e0a24fa2ce8b6b94d2e6a90604e8813aa8e29fcb918bb2aa01cfb6d133d8cee
# sha256 of mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl (--cuda).
cuda_wheel_sha_x86_64=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee

setup_only=false
cuda=false
for arg in "$@"; do
  case "$arg" in
    --setup) setup_only=true ;;
    --cuda) cuda=true ;;
    *) echo "usage: $0 [--setup] [--cuda]" >&2; exit 2 ;;
  esac
done

say() { echo "build_mlx: $*" >&2; }

if [ "$(uname -s)" = Darwin ]; then
  $cuda && { say "error: --cuda is for Linux; on macOS MLX uses Metal"; exit 2; }
  $setup_only && { echo ""; exit 0; }
  say "macOS: building MLX from source with Metal (needs Xcode's command line tools and cmake)"
  cargo build --release --features mlx >&2
  echo "$PWD/target/release/your_ai"
  exit 0
fi

# The wheel: its package name, the name its files start with, its size, its checksum.
package=mlx-cpu
if $cuda; then
  package=mlx-cuda-13
  wheel_sha_x86_64=$cuda_wheel_sha_x86_64
fi
stem=${package//-/_}
size="~10 MB"
$cuda && size="~90 MB"
cache="${YOUR_AI_CACHE:-$HOME/.cache/your_ai}"
wheel_dir="$cache/$package-$mlx_version"
mlx_dir="$wheel_dir/mlx"

# 1. System packages: cmake, libclang for bindgen, a C++20 compiler.
# bindgen needs libclang itself (libclang.so, libclang-N.so); libclang-cpp, which other
# packages bring, is not it.
have_libclang() {
  local d
  for d in /usr/lib/llvm-*/lib /usr/lib/*-linux-gnu ${LIBCLANG_PATH:-}; do
    compgen -G "$d/libclang.so*" >/dev/null || compgen -G "$d/libclang-[0-9]*.so*" >/dev/null &&
      return 0
  done
  return 1
}
missing=()
command -v cmake >/dev/null || missing+=(cmake)
have_libclang || missing+=(libclang-dev)
command -v c++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    say "error: missing ${missing[*]}, and there is no apt-get here: install them, then run again"
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  say "installing ${missing[*]} (apt-get)"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
fi

# 2. The wheel, unpacked whole: libmlx.so finds its BLAS in the sibling $stem.libs/.
if [ ! -f "$wheel_dir/.complete" ] || [ ! -f "$mlx_dir/lib/libmlx.so" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.$package.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  say "fetching the $package==$mlx_version wheel ($size) into $wheel_dir"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    "$package==$mlx_version" -d "$tmp/dl" >&2
  wheel=$(ls "$tmp"/dl/"$stem"-"$mlx_version"-*.whl)
  case "$wheel" in
    *_x86_64.whl)
      echo "$wheel_sha_x86_64  $wheel" | sha256sum --check --status || {
        say "error: $wheel does not have the expected checksum"
        exit 1
      }
      ;;
    *) say "note: no pinned checksum for $(basename "$wheel"); using it as the index gave it" ;;
  esac
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$wheel" "$tmp/unpacked"
  basename "$wheel" >"$tmp/unpacked/.complete"
  # Into place by rename, so an interrupted fetch never leaves half a wheel behind. Archives
  # of mlx-c built against an earlier unpacking are kept (mlx-c-build/).
  if [ -d "$wheel_dir/mlx-c-build" ]; then
    mv "$wheel_dir/mlx-c-build" "$tmp/unpacked/"
  fi
  rm -rf "$wheel_dir"
  mv "$tmp/unpacked" "$wheel_dir"
fi

# 3. The wheel's BLAS is netlib's reference implementation, unoptimized: an MLX training step
# on the CPU spent 94% of its time in its sgemm. The wheel's libblas and liblapack are pointed
# at OpenBLAS (apt's libopenblas0-pthread), which made SmolLM2 steps about 7x faster on 2
# cores. Without apt-get the reference BLAS stays, slow but correct. Not for --cuda: that build
# computes on the GPU, and its folders are meant to be carried to another machine whole.
openblas="/usr/lib/$(uname -m)-linux-gnu/openblas-pthread"
if $cuda; then
  :
elif [ ! -e "$openblas/libblas.so.3" ] && command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  say "installing libopenblas0-pthread (apt-get)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    libopenblas0-pthread >&2 || say "note: no OpenBLAS; MLX keeps the wheel's reference BLAS"
fi
if $cuda; then
  :
elif [ -e "$openblas/libblas.so.3" ]; then
  for lib in blas lapack; do
    for f in "$wheel_dir"/mlx_cpu.libs/lib"$lib"-*.so.*; do
      [ -e "$f" ] || [ -L "$f" ] || continue
      [ "$(readlink "$f")" = "$openblas/lib$lib.so.3" ] || ln -sfn "$openblas/lib$lib.so.3" "$f"
    done
  done
else
  say "note: no OpenBLAS at $openblas; MLX's CPU matmuls use the wheel's reference BLAS (slow)"
fi

if $setup_only; then
  echo "$mlx_dir"
  exit 0
fi

# 4. The binary.
say "building the mlx-enabled release binary (the first build of mlx-c takes a few minutes)"
if $cuda; then
  # Its own build folder, as the CPU build's binary links another libmlx.so. The link needs
  # none of the CUDA libraries libmlx.so loads (vendor/mlx-sys/PATCHES.md).
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-mlx-cuda}"
  MLX_SYS_MLX_DIR="$mlx_dir" CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --features mlx >&2
  bin="$CARGO_TARGET_DIR/release/your_ai"
  strip "$bin"
  case "$bin" in /*) ;; *) bin="$PWD/$bin" ;; esac
  echo "$bin"
  exit 0
fi
MLX_SYS_MLX_DIR="$mlx_dir" cargo build --release --features mlx >&2
echo "$PWD/target/release/your_ai"
