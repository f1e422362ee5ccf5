"""Fixtures shared across test folders."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> Path:
    """scikit-learn's digits prepared once per session (defaults: 32 px, 1,500 train / 297 val)."""
    pytest.importorskip("megatron.energon")
    pytest.importorskip("sklearn")
    from megatron_mimo.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits") / "ds"
    assert prepare_digits(root) == {"train": 1500, "val": 297}
    return root


@pytest.fixture(scope="session")
def digits_av_dataset(tmp_path_factory) -> Path:
    """The digits paired with DTMF tones (``prepare-digits --audio``), prepared once per session."""
    pytest.importorskip("megatron.energon")
    pytest.importorskip("sklearn")
    from megatron_mimo.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits-av") / "ds"
    assert prepare_digits(root, audio=True) == {"train": 1500, "val": 297}
    return root


SHARED_WORLDS = {"tests/distributed/test_precision.py": "tests/distributed/test_checkpoint_resume.py"}
"""Modules that share a session fixture's worlds (tests/resume_worlds.py) run on one worker."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) each module is one group, so
    its module-scoped worlds start once; modules that spawn worlds are handed out first, so the
    one-core unit tests fill the other worker at the end instead of leaving it idle."""
    for item in items:
        module = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(SHARED_WORLDS.get(module, module)))
    items.sort(key=lambda item: item.get_closest_marker("dist") is None)
