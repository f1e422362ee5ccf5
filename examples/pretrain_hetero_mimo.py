"""Heterogeneous MIMO pretraining: images and language branches on disjoint ranks.

    torchrun --standalone --nproc-per-node 4 examples/pretrain_hetero_mimo.py --config tiny_cpu

Any ``megatron-mimo`` flag may follow (``--help`` lists them).
"""

import sys

from megatron_mimo.main import main

if __name__ == "__main__":  # the checkpoint writer re-imports __main__ in helper processes
    sys.exit(main())
