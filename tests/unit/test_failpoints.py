"""Failpoints: inert unless MIMO_FAILPOINTS enables them, a typo is an error, filters match
exactly, and each action does what the failure tests rely on (exit code, sleep, raise)."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_mimo import failpoints
from megatron_mimo.errors import ConfigError
from megatron_mimo.failpoints import ENV, FAILPOINTS, FailpointHit, Rule, hit, parse

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Every test reads the variable anew and leaves no cached rules behind."""
    monkeypatch.delenv(ENV, raising=False)
    failpoints.reset()
    yield
    failpoints.reset()


def enable(monkeypatch, text: str) -> None:
    monkeypatch.setenv(ENV, text)
    failpoints.reset()


def hit_everywhere(**override: int) -> None:
    """Hit every declared failpoint with rank 1 / iteration 2 (or ``override``)."""
    for name, point in FAILPOINTS.items():
        hit(name, **{key: override.get(key, {"rank": 1, "iteration": 2}[key]) for key in point.keys})


def test_inert_when_unset():
    hit_everywhere()
    assert failpoints.active() == {}


def test_the_variable_is_read_once_per_process(monkeypatch):
    hit_everywhere()
    monkeypatch.setenv(ENV, "checkpoint.before_publish=raise")  # too late: already parsed
    hit_everywhere()
    failpoints.reset()
    with pytest.raises(FailpointHit):
        hit_everywhere()


def test_grammar():
    rules = parse(" checkpoint.before_publish=exit(17)@rank1:iter2 ;"
                  "checkpoint.writer_start=sleep(0.5)@iter2;"
                  "checkpoint.prune_moved_aside=raise;")
    assert rules == {
        "checkpoint.before_publish": Rule("exit", 17, (("rank", 1), ("iteration", 2))),
        "checkpoint.writer_start": Rule("sleep", 0.5, (("iteration", 2),)),
        "checkpoint.prune_moved_aside": Rule("raise", None, ()),
    }
    assert parse("") == {} and parse(" ; ") == {}


@pytest.mark.parametrize("text, named", [
    ("checkpoint.befor_publish=exit(17)", "unknown failpoint 'checkpoint.befor_publish'"),
    ("checkpoint.before_publish", "'checkpoint.before_publish' has no action"),
    ("checkpoint.before_publish=explode", "bad action 'explode'"),
    ("checkpoint.before_publish=exit()", "'' is not a number"),
    ("checkpoint.writer_start=sleep(a while)", "'a while' is not a number"),
    ("checkpoint.before_publish=exit(17)@node1", "bad filter term 'node1'"),
    ("checkpoint.before_publish=exit(17)@rank1:", "bad filter term ''"),
    ("checkpoint.prune_moved_aside=exit(17)@rank0", "not hit with a rank"),
    ("checkpoint.before_publish=raise;checkpoint.before_publish=exit(1)", "given twice"),
])
def test_a_bad_entry_is_one_line_naming_it(text, named):
    with pytest.raises(ConfigError, match=re.escape(named)) as refused:
        parse(text)
    assert ENV in str(refused.value) and "\n" not in str(refused.value)


def test_a_typo_fails_the_first_hit_instead_of_injecting_nothing(monkeypatch):
    enable(monkeypatch, "checkpoint.before_publsh=exit(17)")
    with pytest.raises(ConfigError, match="before_publsh"):
        hit("checkpoint.prune_moved_aside", iteration=1)


def test_filters_match_rank_and_iteration_exactly(monkeypatch):
    enable(monkeypatch, "checkpoint.before_publish=raise@rank1:iter2")
    hit("checkpoint.before_publish", rank=0, iteration=2)
    hit("checkpoint.before_publish", rank=1, iteration=1)
    hit("checkpoint.write_in_flight", rank=1, iteration=2)  # another failpoint
    with pytest.raises(FailpointHit, match=r"checkpoint.before_publish \(rank 1, iteration 2\)"):
        hit("checkpoint.before_publish", rank=1, iteration=2)


def test_no_filter_fires_on_every_hit(monkeypatch):
    enable(monkeypatch, "checkpoint.prune_moved_aside=raise")
    for iteration in (1, 7):
        with pytest.raises(FailpointHit):
            hit("checkpoint.prune_moved_aside", iteration=iteration)


def test_a_hit_without_the_declared_values_is_refused_when_enabled(monkeypatch):
    enable(monkeypatch, "checkpoint.before_publish=exit(17)@iter2")
    with pytest.raises(TypeError, match="hit with \\['iteration'\\]"):
        hit("checkpoint.before_publish", iteration=2)


def test_sleep_sleeps_the_given_seconds_then_continues(monkeypatch):
    slept = []
    monkeypatch.setattr(failpoints, "time", SimpleNamespace(sleep=slept.append))
    enable(monkeypatch, "checkpoint.writer_start=sleep(60)@iter2")
    hit("checkpoint.writer_start", rank=0, iteration=1)
    hit("checkpoint.writer_start", rank=0, iteration=2)
    hit("checkpoint.writer_start", rank=1, iteration=2)
    assert slept == [60.0, 60.0]


def test_exit_ends_the_process_at_once_with_the_code():
    script = ("import atexit; atexit.register(print, 'cleanup ran'); "
              "from megatron_mimo import failpoints; "
              "failpoints.hit('checkpoint.before_publish', rank=0, iteration=2); "
              "failpoints.hit('checkpoint.before_publish', rank=1, iteration=2); "
              "print('survived')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                               ENV: "checkpoint.before_publish=exit(17)@rank1"})
    assert done.returncode == 17, done.stderr
    assert done.stdout == ""  # no cleanup, like a killed rank
    assert "failpoint checkpoint.before_publish (rank 1, iteration 2): exiting with code 17" in done.stderr


def test_every_failpoint_is_hit_once_in_the_code_and_documented():
    code = [p for p in (REPO_ROOT / "megatron_mimo").rglob("*.py") if p.name != "failpoints.py"]
    sites = re.findall(r"failpoints\.hit\(\"([^\"]+)\"", "".join(p.read_text() for p in code))
    assert sorted(sites) == sorted(FAILPOINTS)
    docs = (REPO_ROOT / "docs" / "checkpointing.md").read_text()
    for name, point in FAILPOINTS.items():
        assert f"`{name}`" in docs, name
        assert re.search(r"\(mode \d+\)$", point.description), name
