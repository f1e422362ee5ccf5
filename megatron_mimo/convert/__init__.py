"""Hugging Face in and out, on one process: ``convert import-hf`` (a LLaVA, or a CLIP/SigLIP
model and a Llama model, into a checkpoint of ours), ``convert export-hf`` (any layout's
checkpoint back into a LLaVA directory) and the one-process model ``generate`` uses.

- :mod:`~megatron_mimo.convert.single`: a world of one process and both branches at TP1;
- :mod:`~megatron_mimo.convert.rules`: which HF tensors make which parameter, and how;
- :mod:`~megatron_mimo.convert.hf_config` / :mod:`~megatron_mimo.convert.hf_files`: HF configs
  and weight files (names, lazy reads, sharded writes);
- :mod:`~megatron_mimo.convert.importer` / :mod:`~megatron_mimo.convert.exporter` /
  :mod:`~megatron_mimo.convert.checkpoint_io`: the two directions and the checkpoint files.
"""
