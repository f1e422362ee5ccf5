"""Session fixtures shared by test_checkpoint_resume and test_precision (tests/resume_worlds.py);
each module names them ``root`` / ``saved`` / ``resumed``."""

import pytest

from tests.resume_worlds import resume_all, save_all


@pytest.fixture(scope="session")
def resume_root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="session")
def resume_saved(resume_root):
    return save_all(resume_root)


@pytest.fixture(scope="session")
def resume_resumed(resume_root, resume_saved):
    return resume_all(resume_root)
