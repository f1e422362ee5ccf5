"""Real data without a process group: the prepared digits dataset, its checks, the loaders'
plain-type state, the record a resume must match, and the view arithmetic behind sample
agreement between branches (``docs/data.md``)."""

from __future__ import annotations

import gc
import io
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.energon")

from megatron_mimo.data import digits as digits_module  # noqa: E402
from megatron_mimo.data.checks import check_dataset  # noqa: E402
from megatron_mimo.data.digits import DIGIT_WORDS, prepare_digits  # noqa: E402
from megatron_mimo.data.energon import (  # noqa: E402
    ViewSpec,
    build_train_loader,
    build_val_loader,
    close_loaders,
    next_batch,
    sample_format_for,
)
from megatron_mimo.data.loader_state import LoaderRecord, from_plain, to_plain  # noqa: E402
from megatron_mimo.data.source import EnergonSource  # noqa: E402
from megatron_mimo.data.tokenizer import WordTokenizer  # noqa: E402
from megatron_mimo.data.views import assign_branch_views, assign_views  # noqa: E402
from megatron_mimo.errors import DataError  # noqa: E402
from tests.damage import corrupt_first  # noqa: E402

IMAGE_SIZE, SEQ, IMAGE_TOKENS, IMAGE_TOKEN_ID = 16, 24, 4, 255
"""The encoder here is 16 px: the 32 px dataset images are resized on the way in."""
TRAIN, VAL = 1500, 297


@pytest.fixture(scope="module")
def digits(digits_dataset) -> Path:
    return digits_dataset


def fmt(root: Path):
    return sample_format_for(root, IMAGE_SIZE, SEQ, IMAGE_TOKENS, IMAGE_TOKEN_ID)


def view(root: Path, v: int = 0, n: int = 1, workers: int = 0, batch: int = 4) -> ViewSpec:
    return ViewSpec(root, v, n, workers, 1234, batch)


def damaged_copy(digits: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    return copy


def test_prepared_dataset_loads_with_energon_and_has_the_split(digits):
    counts = check_dataset(digits)
    assert sum(n for name, n in counts.items() if name.startswith("train/")) == TRAIN
    assert sum(n for name, n in counts.items() if name.startswith("val/")) == VAL
    keys, answers = [], []
    loader = build_val_loader(view(digits, batch=33), fmt(digits))
    for batch in loader:  # Energon's own val pass: every held-out sample once
        keys += batch["keys"]
        assert batch["pixels"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        rows = torch.arange(len(batch["keys"]))
        answers += batch["labels"][rows, batch["answer_position"]].tolist()
    assert len(keys) == len(set(keys)) == VAL
    tokenizer = WordTokenizer.load(digits)
    assert {tokenizer.words[a] for a in answers} <= set(DIGIT_WORDS)
    assert len({tokenizer.words[a] for a in answers}) == 10


def test_train_views_split_one_epoch_disjointly(digits):
    """Two views of the train split read disjoint halves of it."""
    seen = []
    for v in range(2):
        it = iter(build_train_loader(view(digits, v, 2, batch=50), fmt(digits)))
        seen.append([k for _ in range(8) for k in next_batch(it, view(digits, v, 2))["keys"]])
    assert not set(seen[0]) & set(seen[1])
    assert all(len(set(keys)) == len(keys) == 400 for keys in seen)


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "train" / "shard_000003.tar").unlink(), r"train/shard_000003.tar is missing"),
    (lambda d: shutil.rmtree(d / ".nv-meta"), r"\.nv-meta is missing"),
    (lambda d: (d / ".nv-meta" / "dataset.yaml").unlink(), r"dataset.yaml is missing"),
    (lambda d: (d / ".nv-meta" / ".info.json").write_text("{"), r"\.info\.json: cannot read"),
    (lambda d: _truncate(d / "val" / "shard_000000.tar"), r"val/shard_000000.tar is truncated"),
])
def test_damaged_dataset_is_one_error_naming_the_file(digits, tmp_path, damage, match):
    copy = damaged_copy(digits, tmp_path)
    damage(copy)
    with pytest.raises(DataError, match=match) as error:
        check_dataset(copy)
    assert "\n" not in str(error.value)


def test_missing_tokenizer_names_the_file(digits, tmp_path):
    copy = damaged_copy(digits, tmp_path)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json: cannot read"):
        fmt(copy)


def test_prepare_refuses_to_overwrite_and_counts_what_energon_indexed(digits, tmp_path,
                                                                     monkeypatch):
    with pytest.raises(DataError, match="already exists"):
        prepare_digits(digits)
    write_shards = digits_module.write_shards

    def write_then_damage(root, split, samples, shard_size):  # a tar cut short on disk
        written = write_shards(root, split, samples, shard_size)
        if split == "train":
            _truncate(root / "train" / "shard_000002.tar", keep=0.6)
        return written

    monkeypatch.setattr(digits_module, "write_shards", write_then_damage)
    with pytest.raises(DataError, match=r"train/shard_000002.tar: wrote 250 samples but Energon "
                                        r"indexed \d+"):
        prepare_digits(tmp_path / "damaged")
    assert not (tmp_path / "damaged").exists()  # nothing half-prepared under the name


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_sample_that_fails_to_decode_raises(digits, tmp_path):
    copy = damaged_copy(digits, tmp_path)
    key = corrupt_first(copy / "val" / "shard_000000.tar", "png")
    spec = view(copy, batch=VAL)
    with pytest.raises(DataError, match="failed to read a sample") as error:
        next_batch(iter(build_val_loader(spec, fmt(copy))), spec)
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_is_plain_loads_weights_only_and_resumes_exactly(digits, workers):
    spec = view(digits, 1, 2, workers=workers)
    loader = build_train_loader(spec, fmt(digits))
    it = iter(loader)
    for _ in range(7):
        next_batch(it, spec)
    buffer = io.BytesIO()
    torch.save(to_plain(loader.save_state_rank()), buffer)
    expected = [next_batch(it, spec)["keys"] for _ in range(6)]
    buffer.seek(0)
    state = from_plain(torch.load(buffer, weights_only=True))
    fresh = build_train_loader(spec, fmt(digits))
    fresh.restore_state_rank(state)
    it2 = iter(fresh)
    assert [next_batch(it2, spec)["keys"] for _ in range(6)] == expected
    close_loaders([loader, fresh])


def _source(root: Path, record: LoaderRecord) -> EnergonSource:
    specs = [view(root, v, record.num_views, record.num_workers, record.batch_size)
             for v in record.views]
    return EnergonSource(specs, fmt(root), record, where="language DP rank 0", val_samples=VAL,
                         branch="language", num_microbatches=2, global_batch_size=8,
                         blank_images=False)


CHANGES = [({"num_workers": 2}, "num_workers 0 -> 2"), ({"seed": 7}, "seed 1234 -> 7"),
           ({"num_views": 2, "views": (1,)}, "num_views 1 -> 2; views [0] -> [1]"),
           ({"batch_size": 2}, "batch_size 4 -> 2"), ({"data_path": "/elsewhere"}, "/elsewhere"),
           ({"tokenizer": "abc"}, "tokenizer '' -> 'abc'")]


def test_loader_state_saved_under_other_settings_is_refused(digits):
    record = LoaderRecord(str(digits), 1, (0,), 0, 1234, 4)
    saved = _source(digits, record)
    saved.next_global_batch()
    state = saved.state_dict()
    for change, named in CHANGES:  # what Energon itself would accept silently or fail on late
        other = LoaderRecord(**{**record.__dict__, **change})
        with pytest.raises(DataError, match="saved with other settings") as error:
            other.check_saved(state["record"], "language DP rank 0")
        assert named in str(error.value) and "\n" not in str(error.value)
    mismatched = _source(digits, LoaderRecord(**{**record.__dict__, "seed": 7}))
    with pytest.raises(DataError, match="seed 1234 -> 7"):
        mismatched.load_state_dict(state)
    older = {**state["record"]}
    del older["tokenizer"]  # saved before the tokenizer was recorded: the word list's
    record.check_saved(older, "language DP rank 0")
    same = _source(digits, record)
    same.load_state_dict(state)  # the same settings resume where the saved source stopped
    assert same.consumed_samples == 8
    same.next_global_batch()
    saved.next_global_batch()
    assert same.last_keys == saved.last_keys
    with pytest.raises(DataError, match="lower --eval-iters"):
        next(same.eval_batches(eval_iters=VAL))  # more held-out batches than the split holds


def test_an_evaluation_leaves_the_training_loaders_gc_freeze_in_place(digits):
    """Energon's in-process training loader freezes every live object when it starts (cheap
    full collections); a val pass that unfroze them all at its end made every later full
    collection walk the whole heap: steps ~2.5x slower after the first evaluation."""
    gc.collect()  # earlier tests' unclosed loaders unfreeze when finalised: not in the window
    source = _source(digits, LoaderRecord(str(digits), 1, (0,), 0, 1234, 4))
    try:
        source.next_global_batch()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert len(list(source.eval_batches(eval_iters=1))) == 1
        gc.collect()  # finalises the val loaders' generators
        # Frozen objects that die leave the count (a few, not all); an unfreeze empties it.
        assert gc.get_freeze_count() > 0.9 * frozen
    finally:
        source.close()
        gc.unfreeze()


@pytest.mark.parametrize("images_dp, language_dp", [(1, 3), (4, 2)])  # (2, 1): distributed test
def test_both_branches_read_the_same_samples_in_bridge_order(digits, images_dp, language_dp):
    """Every rank of each branch runs its views; the images DP slices concatenated in DP order
    equal the language DP slices concatenated in DP order, micro-step by micro-step."""
    job_micro = 2 * math.lcm(images_dp, language_dp)

    def branch_keys(dp: int) -> list[list[str]]:
        ranks = []
        for rank in range(dp):
            a = assign_views(job_micro, images_dp, language_dp, dp, rank)
            record = LoaderRecord(str(digits), a.num_views, a.views, 0, 1234, a.batch_size)
            source = _source(digits, record)
            source.next_global_batch()
            ranks.append(source.last_keys)
            source.close()
        return [sum((r[m] for r in ranks), []) for m in range(2)]

    images, language = branch_keys(images_dp), branch_keys(language_dp)
    assert images == language and all(len(m) == job_micro == len(set(m)) for m in images)


def _positions(job_micro: int, dps: dict[str, int], branch: str) -> list[list[int]]:
    """Micro-step positions each DP rank of ``branch`` reads, by its views (view ``v`` reads
    positions ``[v J / V, (v + 1) J / V)``), in DP order."""
    ranks = []
    for rank in range(dps[branch]):
        a = assign_branch_views(job_micro, dps, dps[branch], rank)
        ranks.append([v * a.batch_size + i for v in a.views for i in range(a.batch_size)])
    return ranks


@pytest.mark.parametrize("images_dp, audio_dp, language_dp",
                         [(1, 1, 1), (2, 1, 1), (1, 2, 3), (4, 2, 1), (2, 3, 4), (3, 3, 1)])
def test_three_branches_read_every_micro_step_in_bridge_order(images_dp, audio_dp, language_dp):
    """With an audio branch the views are over lcm(images, audio, language DP): DP rank ``r``
    of every branch reads the ``r``-th slice of each micro-step (what the bridge delivers), so
    every pair of branches agrees sample by sample."""
    dps = {"images": images_dp, "audio": audio_dp, "language": language_dp}
    num_views = math.lcm(images_dp, audio_dp, language_dp)
    job_micro = 2 * num_views
    for branch, dp in dps.items():
        per_rank = job_micro // dp
        assert _positions(job_micro, dps, branch) == [
            list(range(r * per_rank, (r + 1) * per_rank)) for r in range(dp)]
        assert assign_branch_views(job_micro, dps, dp, 0).num_views == num_views
    # two branches: the same views as before the audio branch existed
    two = {"images": images_dp, "language": language_dp}
    for dp in set(two.values()):
        for rank in range(dp):
            assert (assign_branch_views(2 * math.lcm(images_dp, language_dp), two, dp, rank)
                    == assign_views(2 * math.lcm(images_dp, language_dp), images_dp,
                                    language_dp, dp, rank))
    with pytest.raises(DataError, match="lcm of images DP 2, audio DP 3 and language DP 1"):
        assign_branch_views(4, {"images": 2, "audio": 3, "language": 1}, 3, 0)


def test_view_arithmetic_refuses_a_micro_step_that_does_not_split():
    with pytest.raises(DataError, match="does not split over 6 readers"):
        assign_views(4, 2, 3, 2, 0)
    assert assign_views(6, 2, 3, 3, 2).views == (4, 5) and assign_views(6, 2, 3, 2, 1).views == (3, 4, 5)


def test_pixels_are_normalised_as_the_encoder_was_trained(digits):
    """'half' maps [0, 1] to [-1, 1]; 'clip' uses OpenAI CLIP's per-channel mean and std (an
    imported CLIP tower sees what it was pretrained on)."""
    from dataclasses import replace

    from megatron_mimo.config.models import PIXEL_NORMS

    image = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 0.25)
    half = fmt(digits).pixels(image, "k")
    assert torch.equal(half, torch.full_like(image, -0.5))
    clip = replace(fmt(digits), pixel_norm="clip").pixels(image, "k")
    mean, std = PIXEL_NORMS["clip"]
    for channel in range(3):
        expected = torch.tensor((0.25 - mean[channel]) / std[channel])
        assert torch.allclose(clip[channel], expected.expand(IMAGE_SIZE, IMAGE_SIZE))
