"""The typed worker contract: results cross the process boundary as the same dataclasses."""

import json
from dataclasses import dataclass

import pytest

from tests.workers.contract import decode, encode


@dataclass
class Inner:
    values: list[float]


@dataclass
class Outer:
    name: str
    inner: Inner
    by_key: dict[str, Inner]


def test_nested_results_round_trip_through_json(monkeypatch):
    monkeypatch.setattr("tests.workers.contract.PACKAGE", Inner.__module__)
    result = [Outer("a", Inner([1.0, 2.5]), {"x": Inner([])}), None]
    assert decode(json.loads(json.dumps(encode(result)))) == result


def test_a_field_the_worker_did_not_fill_fails_in_the_test(monkeypatch):
    monkeypatch.setattr("tests.workers.contract.PACKAGE", Inner.__module__)
    raw = encode(Inner([1.0]))
    raw["stray"] = 1
    with pytest.raises(TypeError, match="stray"):
        decode(raw)


def test_only_worker_result_classes_are_rebuilt():
    with pytest.raises(ValueError, match="not a tests.workers result"):
        decode(encode(Inner([1.0])))
