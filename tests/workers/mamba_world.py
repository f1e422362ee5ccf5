"""One rank: CpuMambaMixer vs a sequential-scan reference written here; gradients; names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import build_module

from megatron_mimo.config import TransformerSizes
from megatron_mimo.config.layout import branch_spec
from megatron_mimo.distributed.topology import build_topology
from megatron_mimo.models.common import build_transformer_config
from megatron_mimo.models.hybrid import local_hybrid_stack_spec
from megatron_mimo.models.mamba_cpu import CpuMambaMixer
from megatron_mimo.training.seeding import seed_rank
from tests.workers.common import worker_main

HIDDEN, HEAD_DIM, STATE, GROUPS = 32, 8, 6, 2


@dataclass
class MixerCheck:
    """The mixer against the reference, its gradients, parameter layout and checkpoint keys."""

    max_abs_diff: float
    """Largest |CpuMambaMixer - sequential scan| over the output."""
    scale: float
    """Largest |reference output|."""
    grads: dict[str, bool]
    """Per parameter: it received a non-zero gradient."""
    shapes: dict[str, list[int]]
    layer_keys: list[str]
    """Checkpoint keys of one Mamba layer of the local hybrid spec."""
    nheads: int
    d_inner: int


def reference(mixer: CpuMambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """Straightforward per-time-step Mamba-2 recurrence in float64."""
    zxbcdt = mixer.in_proj(hidden)[0].transpose(0, 1).double()  # [b, l, *]
    b, length, _ = zxbcdt.shape
    d_in, n, heads = mixer.d_inner, STATE, mixer.nheads
    z, xbc, dt = zxbcdt.split([d_in, d_in + 2 * GROUPS * n, heads], dim=-1)
    w, bias = mixer.conv1d_weight.double()[:, 0], mixer.conv1d_bias.double()
    k = w.shape[1]
    conv = torch.zeros_like(xbc)
    for t in range(length):
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                conv[:, t] += w[:, j] * xbc[:, src]
    xbc = F.silu(conv + bias)
    x, B, C = xbc.split([d_in, GROUPS * n, GROUPS * n], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias.double())
    A = -torch.exp(mixer.A_log.double())
    y = torch.zeros(b, length, heads, HEAD_DIM, dtype=torch.float64)
    for head in range(heads):
        g = head // (heads // GROUPS)
        state = torch.zeros(b, HEAD_DIM, n, dtype=torch.float64)
        for t in range(length):
            xt = x[:, t, head * HEAD_DIM:(head + 1) * HEAD_DIM]
            bt, ct = B[:, t, g * n:(g + 1) * n], C[:, t, g * n:(g + 1) * n]
            state = torch.exp(dt[:, t, head] * A[head])[:, None, None] * state \
                + dt[:, t, head][:, None, None] * xt[:, :, None] * bt[:, None, :]
            y[:, t, head] = (state * ct[:, None, :]).sum(-1) + mixer.D.double()[head] * xt
    y = y.flatten(-2) * F.silu(z)
    groups = y.unflatten(-1, (GROUPS, -1))
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    y = y * mixer.norm.weight.double()
    return mixer.out_proj(y.float().transpose(0, 1).contiguous())[0]


def body(args: dict[str, Any]) -> MixerCheck:
    topo = build_topology([branch_spec("solo")])
    pgs = topo.pgs()
    config = build_transformer_config(
        TransformerSizes(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64), 1, torch.device("cpu"), normalization="RMSNorm",
        mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS)
    seed_rank(0, "language", 0)
    mixer = CpuMambaMixer(config, MambaMixerSubmodules(ColumnParallelLinear, RowParallelLinear),
                          d_model=HIDDEN, pg_collection=pgs)
    with torch.no_grad():  # move away from the init values so every term matters
        for p in (mixer.D, mixer.norm.weight, mixer.dt_bias):
            p.add_(0.3 * torch.randn_like(p))
    hidden = torch.randn(70, 3, HIDDEN)  # 70 steps: crosses the 64-step chunk boundary
    out, _ = mixer(hidden)
    with torch.no_grad():
        ref = reference(mixer, hidden)
    out.pow(2).sum().backward()
    grads = {name: (p.grad is not None and bool(p.grad.abs().sum() > 0))
             for name, p in mixer.named_parameters()}
    shapes = {name: list(p.shape) for name, p in mixer.named_parameters()}
    layer = build_module(local_hybrid_stack_spec().submodules.mamba_layer, config=config,
                         layer_number=1, pg_collection=pgs)
    keys = sorted({v.key for v in nested_values(layer.sharded_state_dict(
        prefix="layer.", metadata={"dp_cp_group": pgs.dp_cp})) if isinstance(v, ShardedBase)})
    topo.destroy()
    return MixerCheck(max_abs_diff=(out - ref).abs().max().item(), scale=ref.abs().max().item(),
                      grads=grads, shapes=shapes, layer_keys=keys, nheads=mixer.nheads,
                      d_inner=mixer.d_inner)


if __name__ == "__main__":
    worker_main(body)
