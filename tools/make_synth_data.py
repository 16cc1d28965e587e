#!/usr/bin/env python
"""Thin wrapper: ``python tools/make_synth_data.py --out DIR --n N [--seed S] [--difficulty D]``."""
import sys

from megatron_vr1.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "synth", *sys.argv[1:]]))
