"""The per-worker budgets: bytes of request bodies (refused past the limit) and pixels being
decoded (waiting their turn, first come first served)."""

from __future__ import annotations

import asyncio

import pytest

from service.budgets import BodyBudget, PixelBudget
from service.errors import Overloaded


def test_body_budget_refuses_past_its_limit_and_frees_what_is_given_back() -> None:
    budget = BodyBudget(100)
    budget.take(60)
    with pytest.raises(Overloaded):
        budget.take(41)
    budget.take(40)
    budget.give(60)
    budget.take(60)
    assert budget.used == 100


def test_pixel_budget_serves_in_arrival_order() -> None:
    async def main() -> list[str]:
        budget = PixelBudget(100)
        order: list[str] = []

        async def job(name: str, n: int, hold: float) -> None:
            await budget.acquire(n)
            order.append(name)
            await asyncio.sleep(hold)
            budget.release(n)

        await budget.acquire(90)  # held by a first image
        tasks = [asyncio.create_task(job("large", 80, 0.01)), asyncio.create_task(
            job("small", 5, 0.0))]
        await asyncio.sleep(0.01)
        assert order == []  # the small one does not overtake the large one that waits
        budget.release(90)
        await asyncio.gather(*tasks)
        assert budget.used == 0
        return order

    assert asyncio.run(main()) == ["large", "small"]


def test_a_waiter_that_gives_up_takes_nothing_and_blocks_nobody() -> None:
    async def main() -> int:
        budget = PixelBudget(100)
        await budget.acquire(100)
        gives_up = asyncio.create_task(budget.acquire(50))
        after = asyncio.create_task(budget.acquire(30))
        await asyncio.sleep(0)
        gives_up.cancel()
        await asyncio.sleep(0)
        budget.release(100)
        await asyncio.wait_for(after, 1)
        return budget.used

    assert asyncio.run(main()) == 30


def test_an_image_larger_than_the_budget_runs_alone() -> None:
    async def main() -> int:
        budget = PixelBudget(100)
        await asyncio.wait_for(budget.acquire(1000), 1)
        used = budget.used
        budget.release(1000)
        assert budget.used == 0
        return used

    assert asyncio.run(main()) == 100
