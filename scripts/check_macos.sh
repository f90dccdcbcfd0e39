#!/usr/bin/env bash
# Type-checks the crate for Apple silicon (aarch64-apple-darwin) from Linux: `cargo check` of
# every target, with the default features and with `metal` (candle's Metal path), so that code
# only macOS compiles (`cfg(target_os = "macos")`, the non-Linux branches) cannot break
# unnoticed. It compiles, it does not link or run: no macOS SDK is needed. The C code some
# dependencies build (ring's) is compiled with zig's C compiler, which carries the macOS libc
# headers: the pinned `ziglang` wheel from the Python package index, installed into a cache.
#
# The `mlx` feature is not checked here: on macOS it builds MLX from source with Metal, which
# needs Apple's toolchain. Its macOS-only lines are few (src/runtime/memory/mlx.rs).
#
# Usage: scripts/check_macos.sh        (prints "macOS check: ok" on its last line)
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-apple-darwin
zig_version=0.17.1
cache="${XDG_CACHE_HOME:-$HOME/.cache}/your_ai/ziglang-$zig_version"

if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target" >&2
fi
if [ ! -d "$cache/ziglang" ]; then
  rm -rf "$cache.partial"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --no-warn-conflicts --target "$cache.partial" "ziglang==$zig_version" >&2
  mkdir -p "$(dirname "$cache")"
  mv "$cache.partial" "$cache"
fi
# cc-rs passes Apple's `-arch arm64` and a clang `--target`; zig takes its own `-target`.
cc="$cache/cc-aarch64-macos"
cat >"$cc" <<EOF
#!/usr/bin/env bash
args=()
skip=0
for a in "\$@"; do
  if [ \$skip = 1 ]; then skip=0; continue; fi
  case "\$a" in
    -arch) skip=1 ;;
    --target=*) ;;
    *) args+=("\$a") ;;
  esac
done
PYTHONPATH="$cache" exec python3 -m ziglang cc -target aarch64-macos "\${args[@]}"
EOF
chmod +x "$cc"

export CC_aarch64_apple_darwin="$cc"
cargo check --quiet --target "$target" --all-targets
cargo check --quiet --target "$target" --all-targets --features metal
echo "macOS check: ok"
