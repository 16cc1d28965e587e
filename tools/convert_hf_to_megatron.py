"""HF -> Megatron torch_dist checkpoint. Same as ``megatron-vr1 convert hf-to-mcore``:

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N --pp M] [--dtype bfloat16]
"""

import sys

from megatron_vr1.cli import main

if __name__ == "__main__":  # dist_checkpointing may spawn workers that re-import this file
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
