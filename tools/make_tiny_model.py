#!/usr/bin/env python
"""Thin wrapper: ``python tools/make_tiny_model.py ...`` = ``megatron-vr1 data tiny-model ...``."""
import sys

from megatron_vr1.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "tiny-model", *sys.argv[1:]]))
