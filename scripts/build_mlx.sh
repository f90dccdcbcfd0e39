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
#   YOUR_AI_CACHE   cache directory (default: ~/.cache/your_ai)
set -euo pipefail
cd "$(dirname "$0")/.."

mlx_version=0.32.4
# sha256 of mlx_cpu-0.32.4-py3-none-manylinux_2_35_x86_64.whl: a binary is tied to the exact MLX
# it links (any other fails at load with an undefined symbol), so the wheel is pinned.
wheel_sha_x86_64=0e0a24fa2ce8b6b94d2e6a90604e8813aa8e29fcb918bb2aa01cfb6d133d8cee

setup_only=false
case "${1:-}" in
  --setup) setup_only=true ;;
  "") ;;
  *) echo "usage: $0 [--setup]" >&2; exit 2 ;;
esac

say() { echo "build_mlx: $*" >&2; }

if [ "$(uname -s)" = Darwin ]; then
  $setup_only && { echo ""; exit 0; }
  say "macOS: building MLX from source with Metal (needs Xcode's command line tools and cmake)"
  cargo build --release --features mlx >&2
  echo "$PWD/target/release/your_ai"
  exit 0
fi

cache="${YOUR_AI_CACHE:-$HOME/.cache/your_ai}"
wheel_dir="$cache/mlx-cpu-$mlx_version"
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

# 2. The mlx-cpu wheel, unpacked whole: libmlx.so finds its BLAS in the sibling mlx_cpu.libs/.
if [ ! -f "$wheel_dir/.complete" ] || [ ! -f "$mlx_dir/lib/libmlx.so" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.mlx-cpu.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  say "fetching the mlx-cpu==$mlx_version wheel (~10 MB) into $wheel_dir"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    "mlx-cpu==$mlx_version" -d "$tmp/dl" >&2
  wheel=$(ls "$tmp"/dl/mlx_cpu-"$mlx_version"-*.whl)
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
# cores. Without apt-get the reference BLAS stays, slow but correct.
openblas="/usr/lib/$(uname -m)-linux-gnu/openblas-pthread"
if [ ! -e "$openblas/libblas.so.3" ] && command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  say "installing libopenblas0-pthread (apt-get)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    libopenblas0-pthread >&2 || say "note: no OpenBLAS; MLX keeps the wheel's reference BLAS"
fi
if [ -e "$openblas/libblas.so.3" ]; then
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
MLX_SYS_MLX_DIR="$mlx_dir" cargo build --release --features mlx >&2
echo "$PWD/target/release/your_ai"
