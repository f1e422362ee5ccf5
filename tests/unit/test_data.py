"""Mock data and the resumable per-branch sampler."""

import pytest
import torch

from megatron_mimo.config.presets import tiny_cpu
from megatron_mimo.data.mock import MockImageText
from megatron_mimo.data.sampler import BranchSampler, DataPosition
from megatron_mimo.errors import DataError


@pytest.fixture
def data():
    cfg = tiny_cpu()
    return MockImageText(cfg.images, cfg.language, seed=7)


def test_samples_are_a_pure_function_of_seed_and_index(data):
    assert torch.equal(data.pixels([3, 9]), data.pixels([3, 9]))
    assert torch.equal(data.tokens([3])["input_ids"][0], data.tokens([1, 2, 3])["input_ids"][2])
    assert not torch.equal(data.pixels([3]), data.pixels([4]))
    other_seed = MockImageText(data.images, data.language, seed=8)
    assert not torch.equal(other_seed.pixels([3]), data.pixels([3]))


def test_text_layout_and_masks(data):
    batch = data.tokens([0, 1])
    image_id, patches = data.language.image_token_id, data.images.num_image_tokens
    assert batch["input_ids"].shape == (2, data.language.seq_length)
    assert ((batch["input_ids"] == image_id).sum(dim=1) == patches).all()
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    # no loss where the label is an image slot, nor at the last position; loss on all text labels
    assert batch["loss_mask"][:, :patches].sum() == 0 and batch["loss_mask"][:, -1].sum() == 0
    assert batch["loss_mask"][:, patches:-1].eq(1).all()
    assert batch["sample_index"].tolist() == [0, 1]
    assert batch["input_ids"].max() < data.language.vocab_size


def test_text_depends_on_the_image_class(data):
    classes = {data.image_class(i) for i in range(64)}
    assert len(classes) > 8
    a, b = next((i, j) for i in range(64) for j in range(64)
                if data.image_class(i) != data.image_class(j))
    ids = data.tokens([a, b])["input_ids"]
    assert not torch.equal(ids[0], ids[1])


def test_sampler_splits_each_micro_batch_over_dp_in_order():
    ranks = [BranchSampler(job_micro_batch=4, dp_size=2, dp_rank=r) for r in range(2)]
    assert [s.indices(0, 0) for s in ranks] == [[0, 1], [2, 3]]
    assert [s.indices(0, 1) for s in ranks] == [[4, 5], [6, 7]]
    single = BranchSampler(job_micro_batch=4, dp_size=1, dp_rank=0)
    # both branches see the same samples per micro-step, whatever their DP
    assert single.indices(8, 1) == ranks[0].indices(8, 1) + ranks[1].indices(8, 1)


def test_sampler_resumes_at_any_consumed_offset():
    sampler = BranchSampler(job_micro_batch=2, dp_size=2, dp_rank=1)
    straight = [sampler.indices(it * 8, m) for it in range(4) for m in range(4)]
    resumed = [sampler.indices(16 + it * 8, m) for it in range(2) for m in range(4)]
    assert resumed == straight[8:]


def test_sampler_rejects_bad_split():
    with pytest.raises(DataError, match="does not split"):
        BranchSampler(job_micro_batch=3, dp_size=2, dp_rank=0)
    with pytest.raises(DataError, match="outside dp size"):
        BranchSampler(job_micro_batch=4, dp_size=2, dp_rank=2)


def test_data_position_round_trips_and_advances():
    position = DataPosition()
    position.advance(8)
    position.advance(8)
    restored = DataPosition()
    restored.load_state_dict(position.state_dict())
    assert restored.consumed_samples == 16 and restored.state_dict() == {"consumed_samples": 16}


def _mock_source(branch: str, dp_rank: int = 0, dp: int = 2, blank: bool = False):
    from megatron_mimo.data.source import MockSource

    cfg = tiny_cpu()
    return MockSource(MockImageText(cfg.images, cfg.language, seed=7),
                      BranchSampler(job_micro_batch=4, dp_size=dp, dp_rank=dp_rank),
                      branch=branch, num_microbatches=2, global_batch_size=8, blank_images=blank)


def test_mock_source_gives_each_branch_its_fields_and_advances():
    images, language = _mock_source("images", 1), _mock_source("language", 0, dp=1)
    image_batches, text_batches = images.next_global_batch(), language.next_global_batch()
    assert set(image_batches[0]) == {"keys", "pixels"}
    assert {"input_ids", "labels", "loss_mask", "answer_position"} <= set(text_batches[0])
    assert images.last_keys == [["2", "3"], ["6", "7"]]  # DP rank 1's half of each micro-step
    assert language.last_keys == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert images.consumed_samples == language.consumed_samples == 8
    blank = _mock_source("images", 1, blank=True).next_global_batch()
    assert blank[0]["pixels"].abs().sum() == 0 and image_batches[0]["pixels"].abs().sum() > 0


def test_mock_source_state_round_trips_and_refuses_real_data_state():
    source = _mock_source("language")
    source.next_global_batch()
    restored = _mock_source("language")
    restored.load_state_dict(source.state_dict())
    assert restored.upcoming_indices() == source.upcoming_indices() == [8, 9]
    restored.restart_at(24)
    assert restored.upcoming_indices() == [24, 25]
    with pytest.raises(DataError, match="trained on --data-path /data/x"):
        restored.load_state_dict({"consumed_samples": 8, "record": {"data_path": "/data/x"}})
