"""``python -m megatron_mimo.gpu_check`` (``make gpu-check``): one command, for a machine with a GPU,
that checks the Transformer Engine build against the local build the CPU runs use.

Checks, one line each (``PASS``/``FAIL``/``SKIP <name>: <reason>``):

* ``parity/<branch>`` (gpt, vit, radio, mamba_hybrid): the branch built twice in fp32, local spec
  and the GPU build (TE specs; for the hybrid stock ``MambaMixer`` with mamba-ssm's kernels vs
  ``CpuMambaMixer``), the local weights copied across by name, the same input through both.
* ``finetune-load/<branch>``: a checkpoint written by the Trainer on 2 CPU ranks (with
  transformer-engine and mamba-ssm hidden, as on a CPU-only machine) loaded into the GPU build
  the way ``--finetune`` loads weights; its output compared with the CPU's.
* ``bf16-step/<preset>``: one bf16 training step of both branches on the GPU.
* ``finetune-2gpu/<preset>``: ``megatron-mimo --finetune`` from that checkpoint on 2 GPUs.

Nothing here is imported by training; this package imports nothing at import time (its CPU save
worker must hide packages before torch and megatron-core are imported).
"""
