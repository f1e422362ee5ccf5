"""Everything one rank needs to train, built once: topology, model, optimizer, bridge, data,
and the phase timer the bridge and P2P calls report into."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.mimo import MimoModel
from megatron.core.models.mimo.optimizer import MimoOptimizer
from megatron.core.pipeline_parallel.multimodule_communicator import (
    MultiModulePipelineCommunicator,
)
from megatron.core.process_groups_config import MultiModuleProcessGroupCollection

from megatron_mimo.config.layout import LANGUAGE
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.data.source import BranchData, build_branch_data
from megatron_mimo.distributed.runtime import Runtime
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.models.common import TORCH_DTYPES
from megatron_mimo.models.mimo import branch_module, build_mimo_model
from megatron_mimo.training.optimizer import (
    BranchSchedulers,
    build_mimo_optimizer,
    build_schedulers,
)
from megatron_mimo.training.pipeline import (
    build_pipeline_communicator,
    schedule_process_groups,
    time_communication,
)
from megatron_mimo.training.seeding import seed_rank
from megatron_mimo.training.timing import PhaseTimer, device_clock

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """A rank's training objects. Pass it explicitly; nothing here is global."""

    cfg: MimoConfig
    runtime: Runtime
    topology: Topology
    model: MimoModel
    optimizer: MimoOptimizer
    schedulers: BranchSchedulers
    pipeline: MultiModulePipelineCommunicator
    """megatron-core's bridge (images -> language stage 0) + P2P between language stages."""
    schedule_pgs: MultiModuleProcessGroupCollection
    """This rank's groups as the multi-module schedule takes them."""
    data: BranchData
    """This rank's part of every global batch (mock samples or Energon loaders)."""
    timer: PhaseTimer
    """Phase times of the running step or evaluation (each resets it); the communicator's
    bridge and P2P calls report into it."""
    num_parameters: int = 0
    """Parameters of both branches (world-wide, TP shards added up once per branch); set by
    :func:`build_job`."""

    @property
    def branch(self) -> str:
        """This rank's branch."""
        return self.topology.my_branch

    @property
    def dtype(self) -> torch.dtype:
        """Training dtype of weights, activations and bridge traffic."""
        return TORCH_DTYPES[self.cfg.precision.name]

    @property
    def branch_ddp(self) -> DistributedDataParallel:
        """This rank's DDP-wrapped branch module."""
        return branch_module(self.model, self.branch)

    def is_reporting_rank(self) -> bool:
        """The one rank that prints and writes metrics: language branch, TP 0, DP 0, last PP."""
        if self.branch != LANGUAGE:
            return False
        pgs = self.topology.pgs()
        return pgs.tp.rank() == 0 and pgs.dp.rank() == 0 and self.is_last_stage()

    def is_last_stage(self) -> bool:
        """Whether this rank is on its branch's last pipeline stage (images: always)."""
        pp = self.topology.pgs().pp
        return pp.rank() == pp.size() - 1


def build_job(cfg: MimoConfig, runtime: Runtime, topology: Topology) -> Job:
    """Data first (a bad --data-path fails on every rank before any collective), then seed,
    model, optimizer, schedulers and bridge of this rank; the bridge's calls are timed from here
    on."""
    branch = topology.my_branch
    data = build_branch_data(cfg, branch, topology.dp_rank())
    seed_rank(cfg.training.seed, branch, topology.tp_rank())
    model = build_mimo_model(cfg, topology, runtime.device)
    optimizer = build_mimo_optimizer(cfg, model, topology, runtime.device)
    schedulers = build_schedulers(cfg, optimizer, topology)
    communicator = build_pipeline_communicator(topology, model)
    timer = PhaseTimer(device_clock(runtime.device))
    time_communication(communicator, timer)
    job = Job(cfg, runtime, topology, model, optimizer, schedulers, communicator,
              schedule_process_groups(topology), data, timer)
    job.num_parameters = count_parameters(job)
    return job


def count_parameters(job: Job) -> int:
    """Both branches' parameter count: one DP replica of each branch reports its TP shards."""
    local = sum(p.numel() for p in job.branch_ddp.parameters()) if job.topology.dp_rank() == 0 else 0
    total = torch.tensor([float(local)], device=job.runtime.device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def destroy_job(job: Job) -> None:
    """Release the data loaders and the job's process groups (bridge caches, branch grids);
    call on every rank."""
    job.data.close()
    for bridge in job.pipeline.bridge_comms:
        bridge.destroy_broadcast_pgs()
        bridge.destroy_bridge_pgs()
    job.topology.destroy()
