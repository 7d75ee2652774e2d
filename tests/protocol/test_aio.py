"""The shared asyncio helpers: timeouts that never lose a cancellation, re-cancelling."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from fieldtwin.protocol.aio import recancel_stuck, within


async def test_within_times_out_and_returns_results() -> None:
    assert await within(1, asyncio.sleep(0, result=7)) == 7
    with pytest.raises(TimeoutError):
        await within(0.01, asyncio.Event().wait())


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    swallowed = asyncio.Event()

    async def lossy() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.set()  # what a library's wait_for can do on Python 3.11
        await asyncio.Event().wait()  # ...and then it waits for ever

    stuck = asyncio.create_task(lossy(), name="hub-lossy")
    bystander = asyncio.create_task(asyncio.sleep(10), name="other")
    await asyncio.sleep(0)
    stuck.cancel()
    await swallowed.wait()
    assert not stuck.done()
    assert recancel_stuck("hub-") == ["hub-lossy"]  # asked to stop: cancelled again
    done, _ = await asyncio.wait({stuck}, timeout=2)
    assert done
    assert stuck.cancelled()
    assert not bystander.done()  # never asked to stop: left alone
    assert recancel_stuck("other") == []
    bystander.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await bystander
