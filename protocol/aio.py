"""Small asyncio helpers shared by the agent, the hub and the simulator (no I/O here)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``asyncio.wait_for`` without its Python 3.11 flaw.

    In 3.11, ``wait_for`` can swallow a cancellation that arrives just as the inner
    awaitable completes; a loop built on it then never stops. ``asyncio.timeout``
    counts cancellations (``Task.uncancel``) and never loses one. Raises TimeoutError.
    """
    async with asyncio.timeout(seconds):
        return await awaitable


def recancel_stuck(prefix: str) -> list[str]:
    """Cancel again every task named ``prefix*`` that was asked to stop but runs on.

    A library may swallow one cancellation (Python 3.11's ``wait_for``, used inside
    aiomqtt); the request is still counted by ``Task.cancelling()``, so such a task is
    recognisable and a second request reaches it. Returns the names cancelled again.
    """
    names = []
    for task in asyncio.all_tasks():
        if task.get_name().startswith(prefix) and not task.done() and task.cancelling():
            task.cancel()
            names.append(task.get_name())
    return sorted(names)
