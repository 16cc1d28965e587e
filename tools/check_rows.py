#!/usr/bin/env python
"""Thin wrapper: ``python tools/check_rows.py ...`` = ``megatron-vr1 data check ...``."""
import sys

from megatron_vr1.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "check", *sys.argv[1:]]))
