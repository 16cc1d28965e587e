#!/usr/bin/env python
"""Thin wrapper: ``python tools/convert_odinw_to_rows.py annotations.json --images DIR --out rows.jsonl``."""
import sys

from megatron_vr1.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "odinw", *sys.argv[1:]]))
