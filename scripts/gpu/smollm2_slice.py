#!/usr/bin/env python3
"""Writes the first LAYERS blocks of a Llama GGUF as a GGUF of its own: the same metadata
(tokenizer and chat template included) with block_count = LAYERS, the token embedding, the
final norm and the kept blocks' tensors copied byte for byte in their own quantization.

With --embedding TYPE the token embedding is re-quantized to TYPE (Q4_0, Q4_1, Q8_0...).

The GPU check (scripts/gpu_check.sh) takes SmolLM2 along this way, to a machine with no
network: the whole Q4_1 file is 98 MB, 30 MB of it the Q8_0 embedding; two of its thirty blocks
with the embedding in Q4_1 are 24 MB.

    smollm2_slice.py IN.gguf OUT.gguf --layers N [--embedding TYPE]    (needs the gguf package)
"""
import argparse
import os
import re
import sys

import gguf
from gguf import quants


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--embedding", help="re-quantize token_embd.weight to this type")
    a = ap.parse_args()

    r = gguf.GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    count_key = f"{arch}.block_count"
    total = r.fields[count_key].contents()
    if not 0 < a.layers <= total:
        sys.exit(f"--layers {a.layers}: {a.src} has {total} blocks; give 1 to {total}")

    tmp = a.out + ".partial"
    w = gguf.GGUFWriter(tmp, arch)
    for key, field in r.fields.items():
        # The writer sets these itself.
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = a.layers if key == count_key else field.contents()
        w.add_key_value(key, value, vtype, sub)

    kept = 0
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= a.layers:
            continue
        data, kind = t.data, t.tensor_type
        if a.embedding and t.name == "token_embd.weight":
            kind = gguf.GGMLQuantizationType[a.embedding.upper()]
            data = quants.quantize(quants.dequantize(t.data, t.tensor_type), kind)
        # As the reader maps it: quantized tensors as rows of raw blocks, the rest as values.
        w.add_tensor(t.name, data, raw_dtype=kind)
        kept += 1

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, a.out)
    print(f"{a.out}: {a.layers} of {total} blocks, {kept} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
