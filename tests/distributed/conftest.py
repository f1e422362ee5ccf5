"""Session fixtures ``root``, ``saved`` and ``resumed``: the save-then-resume worlds that
test_checkpoint_resume and test_precision share (tests/resume_worlds.py); per case, one
``tests.workers.ckpt_world.Saved`` / ``Resumed`` per rank. A module that defines fixtures of
these names (test_energon_training) uses its own."""

import pytest

from tests.resume_worlds import resume_all, save_all


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="session")
def saved(root):
    return save_all(root)


@pytest.fixture(scope="session")
def resumed(root, saved):
    return resume_all(root)
