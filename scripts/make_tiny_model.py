#!/usr/bin/env python3
"""Write a tiny random HuggingFace checkpoint (the bundled example the README's install command runs on)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test-model factory
from tiny_models import FAMILIES, TinySpec, write_checkpoint  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("output", type=Path)
p.add_argument("--family", choices=sorted(FAMILIES), default="llama")
p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
p.add_argument("--shards", type=int, default=2)
args = p.parse_args()
if (args.output / "config.json").exists():
    print(f"{args.output}: already holds a model, kept as is")
else:
    write_checkpoint(args.output, TinySpec(family=args.family), fmt=args.format, shards=args.shards)
    print(f"{args.output}: tiny {args.family} checkpoint written")
