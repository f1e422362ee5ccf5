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
