#!/usr/bin/env python3
"""Keeps one GPU architecture's machine code in a shared library's CUDA fat binaries, in place.

The mlx-cuda wheel's libmlx.so holds 67 MB of device code: cubins for sm_75, sm_80, sm_90a,
sm_100a, sm_120a and sm_121a, and compute_120 PTX, already compressed by nvcc. The GPU check
(scripts/gpu_check.sh) needs only the H100/H200's sm_90a. Each fat binary in `.nv_fatbin` keeps
its sm_SM cubin; its other entries are zeroed and its header shortened to the kept entry, so
the file keeps its size and layout (nothing else in it moves) and compresses to a fifth. NVIDIA's
nvprune does this for object files, not for shared libraries, and is not in the package index.

    prune_fatbin.py LIB SM        e.g. prune_fatbin.py libmlx.so 90

The layout read here (little-endian): a fat binary is a 16-byte header (magic 0xBA55ED50,
version u16, header size u16, payload size u64) and its entries; an entry starts with kind u16
(1 PTX, 2 cubin), a u16, its header size u32 and payload size u64, and holds the SM number as a
u32 at byte 28.
"""
import struct
import subprocess
import sys

MAGIC = 0xBA55ED50
CUBIN = 2


def fatbin_section(path):
    """Offset and size of `.nv_fatbin` in the file, from readelf."""
    for line in subprocess.check_output(["readelf", "-SW", path], text=True).splitlines():
        if " .nv_fatbin " in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    sys.exit(f"{path}: no .nv_fatbin section")


def prune(sec, sm):
    """Prunes the section's bytes in place; returns (fat binaries, bytes kept, bytes zeroed)."""
    pos = count = kept = zeroed = 0
    while pos + 16 <= len(sec):
        magic, _, header, size = struct.unpack_from("<IHHQ", sec, pos)
        if magic != MAGIC:
            pos += 8  # fat binaries are 8-byte aligned
            continue
        start, end = pos + header, pos + header + size
        keep, p = [], start
        while p < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", sec, p)
            entry = bytes(sec[p : p + entry_header + payload])
            if kind == CUBIN and struct.unpack_from("<I", sec, p + 28)[0] == sm:
                keep.append(entry)
            p += entry_header + payload
        if not keep:
            sys.exit(f"the fat binary at {pos:#x} has no sm_{sm} code")
        blob = b"".join(keep)
        sec[start:end] = blob + bytes(size - len(blob))
        struct.pack_into("<Q", sec, pos + 8, len(blob))
        count, kept, zeroed = count + 1, kept + len(blob), zeroed + size - len(blob)
        pos = end
    return count, kept, zeroed


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, sm = sys.argv[1], int(sys.argv[2])
    offset, size = fatbin_section(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        sec = bytearray(f.read(size))
        count, kept, zeroed = prune(sec, sm)
        f.seek(offset)
        f.write(sec)
    print(f"{path}: {count} fat binaries, kept {kept / 1e6:.1f} MB of sm_{sm} code, "
          f"zeroed {zeroed / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
