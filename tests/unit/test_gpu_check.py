"""The GPU check (``python -m megatron_mimo.gpu_check``): on this CPU machine it prints one SKIP
line per check and exits 0; its rehearsal on the CPU runs every check with the local spec on both
sides; its pure helpers (skips, the TE parameter names, the weight copy, the error measure)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mimo.gpu_check.__main__ import all_checks
from megatron_mimo.gpu_check.names import (
    FAIL,
    PASS,
    TWO_GPUS_REASON,
    Environment,
    NameMismatch,
    copy_parameters,
    relative_error,
    same_name,
    skip_reason,
    te_name,
    within,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+): (.+)$")
NAMES = [check.name for check in all_checks()]


def run_gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_mimo.gpu_check", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def parsed(stdout: str) -> dict[str, tuple[str, str]]:
    lines = stdout.splitlines()
    matches = [LINE.match(line) for line in lines]
    unmatched = [line for line, match in zip(lines, matches, strict=True) if not match]
    assert not unmatched, f"not a check line: {unmatched}"
    return {m.group(2): (m.group(1), m.group(3)) for m in matches}


def test_without_a_gpu_every_check_is_skipped_and_the_exit_code_is_0():
    proc = run_gpu_check(timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == ""
    results = parsed(proc.stdout)
    assert list(results) == NAMES
    assert set(results.values()) == {("SKIP", "no GPU")}


REHEARSED = r"^(parity|bf16-step)/|/(gpt|vit|tiny_cpu)$"
"""Every kind of check, every in-process one; of the torchrun ones (a CPU save and a 2-rank
--finetune, ~9 s each) only tiny_cpu's: tiny_cpu_nemotron's run the same code on another preset
(``make gpu-check ARGS=--rehearse-on-cpu`` rehearses all twelve)."""


@pytest.mark.slow
@pytest.mark.dist
def test_rehearsal_on_the_cpu_passes_every_kind_of_check():
    proc = run_gpu_check("--rehearse-on-cpu", "--only", REHEARSED, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = parsed(proc.stdout)
    assert list(results) == [name for name in NAMES if re.search(REHEARSED, name)]
    assert {name.split("/")[0] for name in results} == {name.split("/")[0] for name in NAMES}
    assert {status for status, _ in results.values()} == {PASS}, proc.stdout
    for name in results:  # local vs local on the CPU: the same numbers
        if name.startswith(("parity/", "finetune-load/")):
            assert "max|diff|/max|ref| 0.00e+00" in results[name][1], results[name]


HIDING_SCRIPT = """
import importlib.util
from megatron_mimo.gpu_check.cpu_save import hide_gpu_packages
assert importlib.util.find_spec("transformer_engine") is not None  # the fake one is visible
hide_gpu_packages()
assert importlib.util.find_spec("transformer_engine") is None
assert importlib.util.find_spec("mamba_ssm") is None
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.ssm.mamba_mixer import HAVE_MAMBA_SSM
assert not HAVE_TE and not HAVE_MAMBA_SSM
print("hidden")
"""


def test_the_cpu_save_hides_installed_gpu_packages(tmp_path):
    for name in ("transformer_engine", "mamba_ssm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise RuntimeError('a hidden package ran')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    proc = subprocess.run([sys.executable, "-c", HIDING_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "hidden", proc.stderr[-2000:]


@pytest.mark.parametrize(("env", "expected"), [
    (Environment(0, True, True), {name: "no GPU" for name in NAMES}),
    (Environment(1, False, False), {
        **{f"{c}/{k}": "no transformer-engine" for c in ("parity", "finetune-load")
           for k in ("gpt", "vit", "radio", "mamba_hybrid")},
        "bf16-step/tiny_cpu": None, "bf16-step/tiny_cpu_nemotron": "no mamba-ssm",
        "finetune-2gpu/tiny_cpu": TWO_GPUS_REASON, "finetune-2gpu/tiny_cpu_nemotron": "no mamba-ssm"}),
    (Environment(2, True, False), {
        **{name: None for name in NAMES},
        **{name: "no mamba-ssm" for name in NAMES if "hybrid" in name or "nemotron" in name}}),
    (Environment(1, True, True), {
        **{name: None for name in NAMES},
        **{name: TWO_GPUS_REASON for name in NAMES if name.startswith("finetune-2gpu/")}}),
])
def test_skip_reasons(env, expected):
    assert {c.name: skip_reason(c.needs, env) for c in all_checks()} == expected


@pytest.mark.parametrize(("local", "te"), [
    ("decoder.layers.0.input_layernorm.weight", "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"),
    ("decoder.layers.11.input_layernorm.bias", "decoder.layers.11.self_attention.linear_qkv.layer_norm_bias"),
    ("decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"),
    ("decoder.layers.2.norm.weight", "decoder.layers.2.mixer.in_proj.layer_norm_weight"),
    ("encoders.vit.backbone.decoder.layers.0.pre_mlp_layernorm.bias",
     "encoders.vit.backbone.decoder.layers.0.mlp.linear_fc1.layer_norm_bias"),
    # unchanged: the mixer's gated norm, final norms, the ViT's pre-norm, plain weights
    ("decoder.layers.2.mixer.norm.weight", "decoder.layers.2.mixer.norm.weight"),
    ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
    ("decoder.final_norm.weight", "decoder.final_norm.weight"),
    ("encoders.vit.backbone.ln_pre.weight", "encoders.vit.backbone.ln_pre.weight"),
    ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_qkv.weight"),
])
def test_te_name(local, te):
    assert te_name(local) == te


def megatron_mapped(name: str, keys_map: dict[str, str]) -> str:
    """Checkpoint key megatron-core gives the layer parameter ``name`` under ``keys_map`` (the
    layer's ``sharded_state_dict_keys_map``, applied by megatron-core's own function)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.utils import apply_prefix_mapping

    prefix = "decoder.layers.3."
    entry = ShardedObject(prefix + name, None, (1,), (0,))
    apply_prefix_mapping({"x": entry}, {prefix + k: prefix + v for k, v in keys_map.items()})
    return entry.key


def local_layer_norms():
    """(label, layer submodules, norm attribute, its parameters) of every local layer spec whose
    norm the TE spec fuses into the next linear."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_mimo.models.hybrid import local_hybrid_stack_spec

    gpt = get_gpt_layer_local_spec().submodules
    hybrid = local_hybrid_stack_spec().submodules
    return [("gpt", gpt, "input_layernorm", ("weight", "bias")),
            ("gpt", gpt, "pre_mlp_layernorm", ("weight", "bias")),
            ("hybrid attention", hybrid.attention_layer.submodules, "input_layernorm", ("weight",)),
            ("hybrid mlp", hybrid.mlp_layer.submodules, "pre_mlp_layernorm", ("weight",)),
            ("hybrid mamba", hybrid.mamba_layer.submodules, "norm", ("weight",))]


@pytest.mark.parametrize("index", range(5))
def test_te_name_is_the_checkpoint_key_of_the_local_specs(index):
    label, submodules, norm, params = local_layer_norms()[index]
    for param in params:
        name = f"{norm}.{param}"
        assert megatron_mapped(name, submodules.sharded_state_dict_keys_map) == \
            te_name(f"decoder.layers.3.{name}"), label


def test_the_local_vit_spec_checkpoints_norms_under_te_names():
    from megatron_mimo.models.vision import local_vit_layer_spec

    keys_map = local_vit_layer_spec().submodules.sharded_state_dict_keys_map
    for name in ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
                 "pre_mlp_layernorm.bias"):
        assert megatron_mapped(name, keys_map) == te_name(f"decoder.layers.3.{name}")


def test_te_specs_fuse_each_norm_into_the_linear_te_name_names():
    """Read from megatron-core's TE specs (the ViT and the stock hybrid build without TE): no norm
    module before attention, the MLP or the Mamba mixer; a LayerNorm-linear right after it."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.models.vision.vit_layer_specs import (
        get_vit_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.identity_op import IdentityOp

    def fc1(mlp):
        return mlp.keywords["submodules"].linear_fc1

    vit, stock = get_vit_layer_with_transformer_engine_spec().submodules, hybrid_stack_spec.submodules
    attention, mlp = stock.attention_layer.submodules, stock.mlp_layer.submodules
    mamba = stock.mamba_layer.submodules
    for layer in (vit, attention):
        assert layer.input_layernorm is IdentityOp
        assert layer.self_attention.submodules.linear_qkv is TELayerNormColumnParallelLinear
    for layer in (vit, mlp):
        assert layer.pre_mlp_layernorm is IdentityOp
        assert fc1(layer.mlp) is TELayerNormColumnParallelLinear
    assert mamba.norm is IdentityOp
    assert mamba.mixer.submodules.in_proj is TELayerNormColumnParallelLinear


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="megatron-core builds its GPT TE spec only with transformer-engine")
def test_gpt_te_spec_fuses_the_norms():
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.identity_op import IdentityOp

    layer = get_gpt_layer_with_transformer_engine_spec().submodules
    assert layer.input_layernorm is IdentityOp and layer.pre_mlp_layernorm is IdentityOp
    assert layer.self_attention.submodules.linear_qkv is TELayerNormColumnParallelLinear


class Layer(torch.nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if not fused:
            self.input_layernorm = torch.nn.LayerNorm(4)
        self.linear = torch.nn.Linear(4, 4)
        if fused:
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(4))
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(4))


def fuse(name: str) -> str:
    return name.replace("input_layernorm.", "linear.layer_norm_").replace(
        "linear.layer_norm_", "layer_norm_")


def test_copy_parameters_by_renamed_name():
    torch.manual_seed(0)
    src, dst = Layer(fused=False), Layer(fused=True)
    with torch.no_grad():
        src.input_layernorm.weight.uniform_()
    assert copy_parameters(src, dst, fuse) == 4
    assert torch.equal(dst.layer_norm_weight, src.input_layernorm.weight)
    assert torch.equal(dst.linear.weight, src.linear.weight)
    same = Layer(fused=False)
    assert copy_parameters(src, same, same_name) == 4
    assert torch.equal(same.input_layernorm.bias, src.input_layernorm.bias)


def test_copy_parameters_refuses_what_does_not_pair_up():
    src, dst = Layer(fused=False), Layer(fused=True)
    with pytest.raises(NameMismatch, match="no source for layer_norm_bias, layer_norm_weight"):
        copy_parameters(src, dst, same_name)
    wide = torch.nn.Module()
    wide.linear = torch.nn.Linear(4, 5)
    narrow = torch.nn.Module()
    narrow.linear = torch.nn.Linear(4, 4)
    with pytest.raises(NameMismatch, match=r"linear.weight: shape \(5, 4\) vs \(4, 4\)"):
        copy_parameters(wide, narrow, same_name)


def test_relative_error_and_verdict():
    reference = torch.tensor([1.0, -4.0])
    assert relative_error(torch.tensor([1.0, -3.0]), reference) == pytest.approx(0.25)
    assert relative_error(torch.tensor([1.0]), reference) == float("inf")
    assert relative_error(torch.tensor([float("nan"), 0.0]), reference) == float("inf")
    assert within("parity/gpt", 1e-4, 2e-3, "x").line() == \
        "PASS parity/gpt: max|diff|/max|ref| 1.00e-04 <= 2e-03 (x)"
    assert within("parity/gpt", 0.5, 2e-3, "x").status == FAIL
