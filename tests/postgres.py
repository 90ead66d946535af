"""A PostgreSQL database of a test's own: $SLMFLEET_TEST_POSTGRES (default: the local server on 127.0.0.1:5432
as user postgres), a database created for the test and dropped after it; the test is skipped, with the reason,
when no server answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine

from benchmarks.common import POSTGRES_ADMIN_URL, postgres_database

ADMIN_URL = POSTGRES_ADMIN_URL


@contextmanager
def own_database(prefix: str = "slmfleet_test") -> Iterator[str]:
    """The URL of a new, empty database; skips the test when no server answers."""
    with postgres_database(prefix) as (url, why):
        if url is None:
            pytest.skip(f"{why}; set SLMFLEET_TEST_POSTGRES to run this")
        yield url


#: parametrize a fixture over both dialects the controller supports (PostgreSQL ones carry the ``postgres`` mark)
DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@contextmanager
def migrated_engine(dialect: str, tmp_path: Path, prefix: str) -> Iterator[Engine]:
    """A migrated, empty database of ``dialect``: a SQLite file in ``tmp_path`` or a PostgreSQL database of its own."""
    from controller.db.engine import make_engine, migrate

    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp_path / (prefix + '.db')}"
        else:
            url = stack.enter_context(own_database(prefix))
        engine = make_engine(url)
        stack.callback(engine.dispose)
        migrate(engine)
        yield engine
