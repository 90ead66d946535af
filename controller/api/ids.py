"""Resources by id or by a unique prefix of it: the CLI and the dashboard print ids shortened, and any of
them (or more characters of one) must be usable wherever an id is taken."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException, status
from sqlmodel import Session, SQLModel, col, func, select

Row = TypeVar("Row", bound=SQLModel)

#: how many candidates an ambiguous prefix lists
SHOWN_CANDIDATES = 10

#: path parameters the routes resolve with :func:`resolve` (a prefix may be ambiguous: 409 in the OpenAPI document)
PREFIX_PARAMS = frozenset({"deployment_id", "rollout_id", "job_id", "artifact_id"})


def resolve(session: Session, table: type[Row], given: str, kind: str) -> Row:
    """The row whose id is ``given`` or, failing that, the only one whose id starts with it.

    404 when none matches; 409 listing the candidates when several do.
    """
    row = session.get(table, given)
    if row is not None:
        return row
    id_column: Any = col(table.id)  # type: ignore[attr-defined]
    # LIKE finds the candidates (an index can serve it); SQLite's LIKE ignores ASCII case, PostgreSQL's does
    # not: the exact comparison of the first characters makes a prefix case-sensitive on both.
    prefix = id_column.startswith(given, autoescape=True) & (func.substr(id_column, 1, len(given)) == given)
    query = select(table).where(prefix).order_by(id_column)
    matches = session.exec(query.limit(SHOWN_CANDIDATES + 1)).all()
    if not matches:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{kind} {given!r} not found")
    if len(matches) > 1:
        shown = ", ".join(str(m.id) for m in matches[:SHOWN_CANDIDATES])  # type: ignore[attr-defined]
        more = " and more" if len(matches) > SHOWN_CANDIDATES else ""
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{kind} id {given!r} is ambiguous: it starts {shown}{more}; give more characters",
        )
    return matches[0]
