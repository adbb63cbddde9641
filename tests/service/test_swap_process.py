"""Versions swapped in a real server process with two workers, under load: nothing lost, every
answer from the version it names, every worker on the last version at the end, and only its
series in /metrics (SIGHUP handled by a single server process, and passed on by the supervisor
to two workers). The full proof (64 clients, 10 swaps, latency and memory) is
``bench/swap_bench.py``; this is its small run."""

from __future__ import annotations

import pytest

from bench.swap_bench import parser, run


@pytest.mark.parametrize("workers", [1, 2])  # SIGHUP handled by the server, or passed on to both
def test_swaps_under_load_lose_nothing_and_answers_name_their_version(workers: int) -> None:
    args = parser().parse_args(["--clients", "8", "--swaps", "3", "--gap", "1.5",
                                "--steady", "1", "--warmup", "1", "--workers", str(workers)])
    result = run(args)
    assert result["non_200"] == 0, result["errors"]
    assert result["requests"] > 100
    assert result["wrong_scores"] == 0  # each answer's scores are its named version's
    assert result["versions_answered"] == ["1", "2", "3", "4"]
    assert result["final_versions"] == ["4"]  # both workers converged on the last version
    # Unloaded versions leave no series in /metrics, and (with two workers, where
    # prometheus-client cannot remove a series) no warning in the log
    assert result["metric_versions"] == ["4"]
    assert result["log_warnings"] == []
