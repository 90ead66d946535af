"""The ingest benchmark's own logic (issue 16): when it stops waiting, and its stage table."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import ingest


def test_waiting_ends_when_all_are_stored_or_when_nothing_more_can_come() -> None:
    count = iter(range(0, 1000, 100))
    assert ingest._wait_stored(lambda: next(count), lambda: True, 500, stall_s=5) > 0  # reached n
    # stuck at 70 with nothing queued in the controller: the rest was dropped before it; the time it last grew
    started = time.time()
    stuck_at = ingest._wait_stored(lambda: 70, lambda: True, 100, stall_s=0.3)
    assert stuck_at <= started + 0.1
    # stuck while the controller still has rows to write: not a loss, so it keeps waiting until the deadline
    busy = [0]

    def idle() -> bool:
        busy[0] += 1
        return False

    try:
        ingest._wait_stored(lambda: 70, idle, 100, stall_s=0.1, timeout=0.6)
    except TimeoutError as exc:
        assert "70 of 100" in str(exc)
    else:
        raise AssertionError("a controller still writing was taken for one that lost messages")
    assert busy[0] > 5


def test_the_stage_table_names_every_stage_on_sqlite(tmp_path: Path) -> None:
    stages = ingest._stages(300, None, tmp_path)
    assert set(stages) == {
        "paho_publish_decode_paho_properties",
        "paho_publish_decode",
        "mqtt_read_paho",
        "mqtt_read",
        "topic_parse_uncached",
        "topic_parse",
        "validate_json_pydantic",
        "validate_json_msgspec",
        "handler_rest",
        "writer_row",
        "writer_insert_commit",
    }
    assert all(stages[k] > 0 for k in ("paho_publish_decode", "mqtt_read", "validate_json_msgspec", "writer_row"))
