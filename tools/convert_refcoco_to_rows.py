#!/usr/bin/env python
"""Thin wrapper: ``python tools/convert_refcoco_to_rows.py instances.json --refs "refs(unc).p" --images DIR --out rows.jsonl``."""
import sys

from megatron_vr1.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "refcoco", *sys.argv[1:]]))
