"""Training on real data through Energon (docs/data.md): both branches read the same samples
under two DP pairings, a resume continues bit for bit with the loader's own state (0 and 2
worker processes; instruction data with the vision tower frozen), the loss of instruction data
counts exactly the answers, three branches (images, audio, language) read the same samples and
resume exactly, and a loader state from another layout is refused. (That each input carries its
own answer: test_hetero_training.py::test_each_input_carries_its_own_answer. A changed --num-workers, seed, batch size or dataset is refused by the record check:
tests/unit/test_energon_data.py.)"""

import json
import tarfile
from pathlib import Path

import pytest

from tests.harness import run_world
from tests.workers.data_world import (
    GLOBAL_BATCH,
    RUNS,
    N,
    Place,
    ResumedRun,
    SavedRun,
)

pytest.importorskip("megatron.energon")
pytestmark = pytest.mark.dist

WORKER = "tests.workers.data_world"


@pytest.fixture(scope="module")
def digits(digits_dataset):
    return str(digits_dataset)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("energon-ckpt"))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from megatron_mimo.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits-vqa") / "ds"
    prepare_digits(root, vqa=True)
    return str(root)


@pytest.fixture(scope="module")
def av(digits_av_dataset):
    return str(digits_av_dataset)


@pytest.fixture(scope="module")
def datasets(digits, vqa, av):
    return {"data": digits, "vqa": vqa, "av": av}


@pytest.fixture(scope="module")
def saved(datasets, root):
    return run_world(WORKER, 4, {"mode": "saved", **datasets, "root": root}, timeout=400)


@pytest.fixture(scope="module")
def resumed(datasets, root, saved):
    return run_world(WORKER, 4, {"mode": "resumed", **datasets, "root": root}, timeout=400)


def _agree(ranks: list[tuple[Place, list[list[str]]]]) -> None:
    """Per micro-batch: every encoder's (images, audio) sample keys in DP order equal the
    language ranks' keys in DP order (the bridge's order); TP ranks of one DP rank read the same
    samples. ``ranks``: every rank's place and its keys per micro-batch of one iteration."""
    def branch_side(branch: str, m: int) -> list[str]:
        by_dp: dict[int, list[str]] = {}
        for place, keys in ranks:
            if place.branch == branch:
                assert by_dp.setdefault(place.dp, keys[m]) == keys[m]
        return sum((by_dp[dp] for dp in sorted(by_dp)), [])

    branches = {place.branch for place, _ in ranks}
    for m in range(len(ranks[0][1])):
        language = branch_side("language", m)
        assert language and len(set(language)) == len(language), language
        for encoder in sorted(branches - {"language"}):
            assert branch_side(encoder, m) == language, (m, encoder, language)


def _named(runs: list[SavedRun] | list[ResumedRun], name: str):
    """The run ``name`` of :data:`RUNS` among ``runs`` (one rank's)."""
    (run,) = [run for run in runs if run.name == name]
    return run


@pytest.mark.parametrize("name", RUNS)
def test_images_dp2_and_language_dp1_read_the_same_samples(saved, name):
    runs = [_named(rank, name) for rank in saved]
    for step in range(2 * N):
        _agree([(run.place, run.straight[step].keys) for run in runs])


def test_images_dp1_and_language_dp3_read_the_same_samples(resumed):
    for step in range(N):
        _agree([(r.fan_out.place, r.fan_out.steps[step].keys) for r in resumed])


@pytest.mark.parametrize("name", RUNS)
def test_resume_on_real_data_is_bit_exact_with_the_loader_state(saved, resumed, name):
    for rank_saved, rank_resumed in zip(saved, resumed, strict=True):
        run = _named(rank_saved, name)
        assert run.until_save == run.straight[:N]
        got = _named(rank_resumed.runs, name)
        assert got.iteration == N
        # every exact record key and this rank's sample keys of every micro-batch
        assert got.steps == run.straight[N:]


def _answers(dataset: str) -> dict[str, list[str]]:
    """Every sample's answers, read from the shards themselves (key -> answers)."""
    out = {}
    for shard in Path(dataset).glob("*/*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    text = json.load(tar.extractfile(member))
                    out[member.name.removesuffix(".json")] = text["answers"]
    return out


def test_instruction_loss_counts_exactly_the_answers_and_their_end_tokens(saved, vqa):
    """Per iteration, the world's loss tokens are the words of every sample's (first) answer
    plus its end token: no question, image or padding token is trained."""
    answers = _answers(vqa)
    runs = [_named(rank, "vqa") for rank in saved]
    language = [run for run in runs if run.place.branch == "language" and run.place.tp == 0]
    for step in range(2 * N):
        keys = [key for run in language for batch in run.straight[step].keys for key in batch]
        assert len(keys) == GLOBAL_BATCH, keys
        expected = sum(len(answers[key][0].split()) + 1 for key in keys)
        assert {run.straight[step].record["num_tokens"] for run in runs} == {expected}, step


def test_layout_change_cannot_resume_the_loader(resumed):
    for rank in resumed:
        error = rank.other_layout_error
        assert error and error.startswith("DataError") and "layout changed" in error
