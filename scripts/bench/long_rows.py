#!/usr/bin/env python3
"""Writes plain-text training rows longer than any length a benchmark asks for, so every batch
is full length, as the memory estimate sizes it: ROWS rows of WORDS words drawn in a fixed
order from the shipped example's text. Standard library only.

    long_rows.py OUT.jsonl [--rows 8] [--words 3000]
"""
import argparse
import json
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--words", type=int, default=3000)
    a = ap.parse_args()
    with open(os.path.join(ROOT, "examples", "invented-country", "train.jsonl")) as f:
        words = re.findall(r"[A-Za-z]+", f.read())
    with open(a.out, "w") as f:
        for r in range(a.rows):
            text = " ".join(words[(r * 37 + i) % len(words)] for i in range(a.words))
            f.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
