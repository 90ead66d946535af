"""The ``NonceStore`` protocol (agent/core/guard.py) against ``MemoryNonceStore`` (simulated devices) and
``DiskNonceStore`` (agent/runtime/nonces.py): the saved memory is what a reopened store loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.guard import MemoryNonceStore, NonceMemory, NonceStore
from agent.runtime.nonces import DiskNonceStore

Reopen = Callable[[], NonceStore]


@pytest.fixture(params=["memory", "disk"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Reopen:
    if request.param == "memory":
        store = MemoryNonceStore()
        return lambda: store
    return lambda: DiskNonceStore(tmp_path)


def test_a_fresh_store_remembers_nothing(reopen: Reopen) -> None:
    assert reopen().load() == NonceMemory()


def test_the_saved_memory_is_what_a_reopened_store_loads(reopen: Reopen) -> None:
    memory = NonceMemory(seen={"n1": (100.0, 160.0), "n2": (101.5, 161.5)}, floor=42.0)
    reopen().save(memory)
    assert reopen().load() == memory
    memory.seen.clear()  # the store holds its own copy
    assert set(reopen().load().seen) == {"n1", "n2"}


def test_the_last_save_wins(reopen: Reopen) -> None:
    reopen().save(NonceMemory(seen={"old": (1.0, 2.0)}))
    reopen().save(NonceMemory(seen={"new": (3.0, 4.0)}, floor=3.0))
    assert reopen().load() == NonceMemory(seen={"new": (3.0, 4.0)}, floor=3.0)
