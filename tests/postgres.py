"""A PostgreSQL database of a test's own: $SLMFLEET_TEST_POSTGRES (default: the local server on 127.0.0.1:5432
as user postgres), a database created for the test and dropped after it; the test is skipped, with the reason,
when no server answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from benchmarks.common import POSTGRES_ADMIN_URL, postgres_database

ADMIN_URL = POSTGRES_ADMIN_URL


@contextmanager
def own_database(prefix: str = "slmfleet_test") -> Iterator[str]:
    """The URL of a new, empty database; skips the test when no server answers."""
    with postgres_database(prefix) as (url, why):
        if url is None:
            pytest.skip(f"{why}; set SLMFLEET_TEST_POSTGRES to run this")
        yield url
