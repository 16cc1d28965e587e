"""Megatron torch_dist checkpoint -> HF safetensors. Same as ``megatron-vr1 convert mcore-to-hf``:

    python tools/convert_megatron_to_hf.py --ckpt DIR --hf-config DIR --out DIR [--max-shard-size 5GB]
"""

import sys

from megatron_vr1.cli import main

if __name__ == "__main__":  # dist_checkpointing may spawn workers that re-import this file
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
