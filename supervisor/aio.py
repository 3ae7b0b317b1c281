"""asyncio helpers every layer uses."""

from __future__ import annotations

import asyncio
from typing import Any


async def shielded(coro: Any) -> Any:
    """Run cleanup to the end even if the swap itself is being cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
