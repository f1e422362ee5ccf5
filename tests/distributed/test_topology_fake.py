"""Production-size layouts (64 and 128 ranks) on torch's fake backend, one rank at a time.

Expected memberships are worked out by hand from the grid order tp-cp-dp-pp (tp fastest).
"""

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_mimo.config.layout import branch_spec
from megatron_mimo.distributed.topology import build_topology
from megatron_mimo.errors import ConfigError

LAYOUT_64 = [branch_spec("images", tp=2, dp=8, offset=0),
             branch_spec("language", tp=8, dp=2, pp=3, offset=16)]
LAYOUT_128 = [branch_spec("images", tp=4, dp=8, offset=0),
              branch_spec("language", tp=8, dp=4, pp=3, offset=32)]


@pytest.fixture
def fake_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # HyperCommGrid prefers it over the group
    topologies = []

    def build(rank, world_size, specs):
        dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
        topo = build_topology(specs)
        topologies.append(topo)
        return topo

    yield build
    for topo in topologies:
        topo.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def ranks(group):
    return None if group is None else dist.get_process_group_ranks(group)


def test_64_language_middle_stage(fake_world):
    topo = fake_world(37, 64, LAYOUT_64)
    pgs = topo.pgs()
    assert topo.my_branch == "language" and not topo.in_branch("images")
    assert ranks(pgs.tp) == list(range(32, 40))
    assert ranks(pgs.dp) == [37, 45]
    assert ranks(pgs.pp) == [21, 37, 53]
    assert ranks(pgs.mp) == list(range(16, 24)) + list(range(32, 40)) + list(range(48, 56))
    assert ranks(pgs.intra_dist_opt) == list(range(16, 64))
    assert ranks(pgs.expt_dp) == [37, 45]
    assert pgs.embd is None and pgs.pos_embd is None  # middle PP stage holds no embedding
    assert topo.dp_rank() == 0 and topo.tp_rank() == 5


def test_64_language_first_stage_embedding_groups(fake_world):
    topo = fake_world(21, 64, LAYOUT_64)
    pgs = topo.pgs()
    assert ranks(pgs.embd) == [21, 53]
    assert ranks(pgs.pos_embd) == [21]


def test_64_images_rank(fake_world):
    topo = fake_world(5, 64, LAYOUT_64)
    pgs = topo.pgs()
    assert topo.my_branch == "images"
    assert ranks(pgs.tp) == [4, 5]
    assert ranks(pgs.dp) == list(range(1, 16, 2))
    assert ranks(pgs.pp) == [5]
    assert topo.dp_rank() == 2 and topo.tp_rank() == 1
    with pytest.raises(ValueError, match="not in the language"):
        topo.pgs("language")


def test_128_language_last_stage(fake_world):
    topo = fake_world(100, 128, LAYOUT_128)
    pgs = topo.pgs()
    assert ranks(pgs.tp) == list(range(96, 104))
    assert ranks(pgs.dp) == [100, 108, 116, 124]
    assert ranks(pgs.pp) == [36, 68, 100]
    assert ranks(pgs.embd) == [36, 100]
    assert pgs.pos_embd is None
    assert pgs.tp.size() * pgs.dp.size() * pgs.pp.size() == 96


def test_128_images_rank(fake_world):
    topo = fake_world(13, 128, LAYOUT_128)
    pgs = topo.pgs()
    assert ranks(pgs.tp) == [12, 13, 14, 15]
    assert ranks(pgs.dp) == list(range(1, 32, 4))
    assert ranks(pgs.intra_dist_opt) == list(range(32))


def test_layout_not_matching_world_fails_before_any_group(fake_world):
    with pytest.raises(ConfigError, match="world has 60 ranks"):
        fake_world(0, 60, LAYOUT_64)
