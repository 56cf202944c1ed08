"""How many of the flow's generation-bound stages run at once: the command line's --jobs, else the launch
section's `jobs`, else two on a CPU-only machine with two or more CPUs."""

from __future__ import annotations

import pytest

from flows.lifecycle import side_by_side
from lmforge.config import parse_section


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})


def test_auto_runs_two_on_a_two_core_cpu_and_one_with_torchrun_workers(cpu_only, monkeypatch):
    assert side_by_side(parse_section("launch", {}), None) == 2
    assert side_by_side(parse_section("launch", {"nproc_per_node": 2}), None) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert side_by_side(parse_section("launch", {}), None) == 1


def test_the_launch_section_sets_it_and_the_command_line_wins(cpu_only):
    one = parse_section("launch", {"jobs": 1})  # the smollm2 preset's: its stages are matmul-bound
    assert side_by_side(one, None) == 1 and side_by_side(one, 2) == 2
    assert side_by_side(parse_section("launch", {}), 1) == 1
    with pytest.raises(Exception, match="jobs"):
        parse_section("launch", {"jobs": -1})
