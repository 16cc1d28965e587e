#!/usr/bin/env python
"""Thin wrapper: ``python tools/convert_coco_to_rows.py instances.json --images DIR --out rows.jsonl [filters]``."""
import sys

from megatron_vr1.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "coco", *sys.argv[1:]]))
