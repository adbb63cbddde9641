"""Choosing the provider: forced, CUDA unusable (this machine), and auto's timing of both,
with the GPU side of the timing replaced (no GPU here)."""

from __future__ import annotations

from pathlib import Path

import pytest

import service.providers as providers
from service.config import Settings
from service.providers import CPU, CUDA, choose_providers, time_batch


def test_on_a_host_without_cuda_auto_says_why_it_runs_on_the_cpu(shipped_model: Path) -> None:
    chain, note = choose_providers(Settings(), shipped_model.read_bytes())
    assert chain == [CPU] and note.startswith("CUDA not usable: ")
    chain, note = choose_providers(Settings(provider="cpu"), shipped_model.read_bytes())
    assert chain == [CPU] and note == "CPU forced by settings"


@pytest.mark.parametrize(("gpu_s", "picked"), [(1.0, CPU), (1e-6, CUDA)])
def test_auto_picks_the_faster_provider_and_says_by_how_much(
        shipped_model: Path, monkeypatch: pytest.MonkeyPatch, gpu_s: float,
        picked: str) -> None:
    """A full batch really timed on the CPU against a stated GPU time: the faster wins."""
    monkeypatch.setattr(providers, "cuda_usable", lambda: (True, "1 CUDA device(s)"))
    real = providers.time_batch
    monkeypatch.setattr(providers, "time_batch", lambda model, settings, chain: (
        real(model, settings, chain) if chain == [CPU] else gpu_s))
    chain, note = choose_providers(Settings(max_batch_size=32), shipped_model.read_bytes())
    assert providers.provider_name(chain[0]) == picked
    assert "a batch of 32 took" in note and (picked == CPU) == note.startswith("auto: CPU")


def test_the_timing_is_of_a_full_batch(shipped_model: Path) -> None:
    one = time_batch(shipped_model.read_bytes(), Settings(max_batch_size=1), [CPU])
    many = time_batch(shipped_model.read_bytes(), Settings(max_batch_size=64), [CPU])
    assert 0 < one < many
