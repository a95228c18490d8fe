"""Tests for meddiff.runtime: the threads a machine's load leaves, reading the load, the hardware line."""
from __future__ import annotations

import pytest
import torch

from meddiff import runtime
from meddiff.runtime import describe, others_load, threads_for_load


@pytest.mark.parametrize("cpus, load, total, most, expected", [
    (2, 0.0, None, None, 2),      # a quiet 2-core machine: both cores
    (2, 0.3, None, None, 2),      # a little background work does not cost a thread
    (2, 1.0, None, None, 1),      # issue 19: one of two cores taken → one thread, not two that stall each other
    (2, 0.6, None, None, 1),
    (2, 5.0, None, None, 1),      # overloaded: never fewer than one
    (8, 3.0, None, None, 5),
    (8, 3.0, None, 4, 4),         # never more than torch's own default (one a physical core)
    (2, 8.0, 16, None, 1),        # 8 busy of 16 CPUs: about 1 of this process's 2
    (2, 4.0, 64, None, 2),        # a big host's load spreads over its 64 CPUs: this process's 2 stay free
    (4, -1.0, None, None, 4),     # a nonsense load reads as none
])
def test_threads_for_load(cpus: int, load: float, total: int | None, most: int | None, expected: int) -> None:
    assert threads_for_load(cpus, load, total, most) == expected


@pytest.mark.parametrize("text, expected", [
    ("0.58 0.43 0.23 1/108 7489\n", 0.0),   # only this process runs
    ("1.02 0.90 0.50 2/108 7489\n", 1.0),   # one other process, for a minute and now
    ("1.90 1.20 0.60 1/108 7489\n", 0.0),   # a run that just ended: the average lags, the run queue is empty
    ("0.05 0.10 0.20 3/108 7489\n", 0.05),  # two short-lived tasks caught in the snapshot: the average says quiet
])
def test_others_load_takes_the_smaller_of_average_and_run_queue(text: str, expected: float) -> None:
    assert others_load(text) == pytest.approx(expected)


@pytest.mark.parametrize("threads, cpus, expected", [(1, 2, "1 thread of 2 CPUs"), (2, 2, "2 threads"),
                                                     (3, 8, "3 threads of 8 CPUs")])
def test_describe_shows_threads_against_usable_cpus(monkeypatch: pytest.MonkeyPatch, threads: int, cpus: int,
                                                    expected: str) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: cpus)
    assert expected + ")" in describe(torch.device("cpu"), "fp32")
