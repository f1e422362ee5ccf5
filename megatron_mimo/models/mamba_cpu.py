"""A CPU path for megatron-core's Mamba-2 mixer, with the stock parameter names and shapes.

megatron-core's ``MambaMixer`` refuses to build without mamba-ssm's CUDA kernels (its
``__init__`` raises ImportError). :class:`CpuMambaMixer` *is a* ``MambaMixer`` (same parameters:
``in_proj``, ``conv1d_weight``, ``conv1d_bias``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``,
``out_proj``; same ``sharded_state_dict``, so checkpoints move between the CPU and the GPU build)
whose forward is plain torch: causal depthwise conv, then the SSD recurrence computed chunk by
chunk (quadratic inside a chunk, state carried between chunks), gated grouped RMSNorm.
Training only (no inference cache, no packed sequences, no context parallelism).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

CHUNK = 64


class GatedGroupRMSNorm(nn.Module):
    """RMSNorm over groups of channels, applied to ``y * silu(z)`` (mamba-ssm's RMSNormGated
    with ``norm_before_gate=False``); its TP group is set at construction, never looked up."""

    def __init__(self, hidden: int, group_size: int, tp_group, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.group_size, self.eps, self.tp_group = group_size, eps, tp_group

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is not None:
            y = y * F.silu(z)
        grouped = y.float().unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight).to(y.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along dim 0 over the branch's TP group (as ExtendedRMSNorm does)."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


def ssd_chunked(x, dt, A, B, C, chunk: int = CHUNK) -> torch.Tensor:
    """Mamba-2 SSD scan. x [b,l,h,p], dt [b,l,h] (after softplus), A [h] (negative),
    B, C [b,l,h,n] (already expanded to heads). Returns y [b,l,h,p] without the D skip."""
    batch, length, heads, head_dim = x.shape
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    outputs = []
    for start in range(0, length, chunk):
        sl = slice(start, min(start + chunk, length))
        xc, dtc, Bc, Cc = x[:, sl], dt[:, sl], B[:, sl], C[:, sl]
        log_decay = torch.cumsum(dtc * A, dim=1)  # [b,q,h]: sum_{k<=t} dt_k A
        # within the chunk: y_t = sum_{s<=t} exp(L_t - L_s) (C_t . B_s) dt_s x_s
        seg = log_decay.unsqueeze(2) - log_decay.unsqueeze(1)  # [b,t,s,h]
        causal = torch.ones(seg.shape[1], seg.shape[2], dtype=torch.bool, device=x.device).tril()
        weights = torch.exp(seg.masked_fill(~causal[None, :, :, None], float("-inf")))
        scores = torch.einsum("bthn,bshn->btsh", Cc, Bc) * weights
        y = torch.einsum("btsh,bsh,bshp->bthp", scores, dtc, xc)
        # contribution of the state carried in from earlier chunks
        y = y + torch.einsum("bthn,bhpn,bth->bthp", Cc, state, torch.exp(log_decay))
        outputs.append(y)
        # carry the state to the end of this chunk
        to_end = torch.exp(log_decay[:, -1:] - log_decay)  # [b,q,h]
        state = state * torch.exp(log_decay[:, -1])[..., None, None] + torch.einsum(
            "bsh,bsh,bshp,bshn->bhpn", to_end, dtc, xc, Bc)
    return torch.cat(outputs, dim=1)


class CpuMambaMixer(MambaMixer):
    """``MambaMixer`` that builds and trains without mamba-ssm (see module docstring)."""

    def __init__(self, config, submodules: MambaMixerSubmodules, d_model, d_conv=4, expand=2,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 layer_number=None, pg_collection=None, pp_layer_offset: int = 0,
                 name: str | None = None, **unused) -> None:
        MegatronModule.__init__(self, config)
        if config.mamba_num_heads is not None or config.context_parallel_size != 1:
            raise ValueError("CpuMambaMixer derives heads from expand*d_model/headdim and needs CP 1")
        self.config, self.d_model, self.d_conv, self.expand = config, d_model, d_conv, expand
        self.layer_number, self.pp_layer_offset, self.pg_collection = layer_number, pp_layer_offset, pg_collection
        self.tp_group = pg_collection.tp
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate, self.activation = False, True, False, "silu"
        self.d_state, self.headdim, self.ngroups = config.mamba_state_dim, config.mamba_head_dim, config.mamba_num_groups
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // self.headdim
        tp = self.tp_group.size()
        if self.nheads % tp or self.ngroups % tp or self.nheads % self.ngroups:
            raise ValueError(f"mamba heads {self.nheads} / groups {self.ngroups} do not split over tp {tp}")
        self.nheads_local_tp, self.d_inner_local_tp = self.nheads // tp, self.d_inner // tp
        self.ngroups_local_tp = self.ngroups // tp
        self._build_projections(submodules, name)
        self._build_ssm_parameters(A_init_range, dt_min, dt_max, dt_init_floor)

    def _build_projections(self, submodules, name) -> None:
        cfg, tp_group = self.config, self.tp_group
        self.in_proj = build_module(
            submodules.in_proj, self.d_model,
            self.d_inner * 2 + 2 * self.ngroups * self.d_state + self.nheads,  # z x B C dt
            config=cfg, init_method=cfg.init_method, gather_output=False, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1", tp_group=tp_group)
        self.out_proj = build_module(
            submodules.out_proj, self.d_inner, self.d_model, config=cfg,
            init_method=cfg.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=tp_group)
        self.norm = GatedGroupRMSNorm(self.d_inner_local_tp, self.d_inner_local_tp // self.ngroups_local_tp,
                                      tp_group)
        self._mark_tp(self.norm.weight)

    def _build_ssm_parameters(self, A_init_range, dt_min, dt_max, dt_init_floor) -> None:
        """Drawn whole from the default generator and sliced to this TP rank (as megatron-core's
        CPU initialisation does for linear layers): the values depend neither on the TP size nor,
        since every layer reseeds, on the pipeline split."""
        dtype = self.config.params_dtype
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        weight = torch.empty(conv_dim, 1, self.d_conv, dtype=dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.d_conv)
        bias = torch.empty(conv_dim, dtype=dtype).uniform_(-bound, bound)
        dt = torch.exp(torch.rand(self.nheads, dtype=dtype)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        A = torch.empty(self.nheads, dtype=torch.float32).uniform_(*A_init_range)
        rows, heads = self._local_conv_rows(), self._local_heads()
        self.conv1d_weight = nn.Parameter(weight[rows].clone())
        self.conv1d_bias = nn.Parameter(bias[rows].clone())
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt)))[heads].clone())
        self.A_log = nn.Parameter(torch.log(A)[heads].clone())
        self.D = nn.Parameter(torch.ones(self.nheads_local_tp))
        for param in (self.conv1d_weight, self.conv1d_bias, self.dt_bias, self.A_log, self.D):
            self._mark_tp(param)

    def _local_heads(self) -> slice:
        rank = self.tp_group.rank()
        return slice(rank * self.nheads_local_tp, (rank + 1) * self.nheads_local_tp)

    def _local_conv_rows(self) -> torch.Tensor:
        """This TP rank's rows of the whole conv: its x channels, then its B and its C groups."""
        rank, x_local = self.tp_group.rank(), self.d_inner_local_tp
        bc_local, bc_whole = self.ngroups_local_tp * self.d_state, self.ngroups * self.d_state
        x = torch.arange(rank * x_local, (rank + 1) * x_local)
        b = self.d_inner + torch.arange(rank * bc_local, (rank + 1) * bc_local)
        return torch.cat([x, b, b + bc_whole])

    @staticmethod
    def _mark_tp(param: nn.Parameter) -> None:
        param.tensor_model_parallel, param.partition_dim = True, 0

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        """hidden_states [l, b, d] -> (out [l, b, d], bias)."""
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError("CpuMambaMixer supports training forward only")
        zxbcdt, _ = self.in_proj(hidden_states)
        y = self.mix(zxbcdt.transpose(0, 1))
        return self.out_proj(y.transpose(0, 1).contiguous())

    def mix(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """[b, l, in_proj_out] -> gated, normalised SSM output [b, l, d_inner_local]."""
        d_in, groups, n = self.d_inner_local_tp, self.ngroups_local_tp, self.d_state
        z, xbc, dt = torch.split(zxbcdt, [d_in, d_in + 2 * groups * n, self.nheads_local_tp], dim=-1)
        length = xbc.shape[1]
        xbc = F.conv1d(xbc.transpose(1, 2), self.conv1d_weight, self.conv1d_bias,
                       padding=self.d_conv - 1, groups=xbc.shape[-1])[..., :length]
        x, B, C = torch.split(F.silu(xbc).transpose(1, 2), [d_in, groups * n, groups * n], dim=-1)
        heads_per_group = self.nheads_local_tp // groups
        x = x.unflatten(-1, (self.nheads_local_tp, self.headdim)).float()
        B = B.unflatten(-1, (groups, n)).repeat_interleave(heads_per_group, dim=2).float()
        C = C.unflatten(-1, (groups, n)).repeat_interleave(heads_per_group, dim=2).float()
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y = ssd_chunked(x, dt, -torch.exp(self.A_log.float()), B, C)
        y = y + x * self.D.float()[:, None]
        return self.norm(y.flatten(-2).to(zxbcdt.dtype), z)
