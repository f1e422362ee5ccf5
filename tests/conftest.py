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
"""Modules that share a session fixture's worlds (tests/resume_worlds.py): one group."""


class ModuleScheduling:
    """Under pytest-xdist (``make test`` runs ``-n 2``) each test module goes to one worker as a
    whole, so its module-scoped worlds start once (xdist's ``--dist loadgroup`` ignores marks
    added at collection with pytest 9 here; its ``loadfile`` would split SHARED_WORLDS)."""

    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::")[0]
                return SHARED_WORLDS.get(module, module)

        return Scheduling(config, log)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(ModuleScheduling(), "module-scheduling")


def pytest_collection_modifyitems(config, items):
    """Modules that spawn worlds first: xdist hands modules out in this order, so the one-core
    unit tests fill the other worker at the end instead of leaving it idle."""
    items.sort(key=lambda item: item.get_closest_marker("dist") is None)
