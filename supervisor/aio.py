"""asyncio helpers every layer uses."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, TypeVar

T = TypeVar("T")


async def shielded(coro: Any) -> Any:
    """Run cleanup to the end even if the swap itself is being cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`aw`, or TimeoutError after `timeout` seconds. Unlike asyncio.wait_for on Python 3.11, a
    cancellation that lands as `aw` completes is never lost (CPython gh-86296): a shutdown cancels
    a swap once, and the swap's cleanups are not cut short by cancellations sent again."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)  # pragma: no cover (3.10: wait_for has no such bug there)
