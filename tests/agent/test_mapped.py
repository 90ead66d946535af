"""Weights read in place from a memory-mapped file, and mapped pages given back (issue 19), on real onnxruntime."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.inference import mapped
from agent.inference.session import load_session
from agent.telemetry.system import _clean_read_only_mappings, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")

ROWS, WIDTH = 8192, 256  # an 8 MiB float32 table, as a word-embedding table is


def _resident_kib(start: int, end: int) -> int:
    """Resident KiB of this process's mappings inside [start, end)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = start <= lo and hi <= end
        elif inside and head == "Rss:":
            total += int(line.split()[1])
    return total


def _gather_model(root: Path) -> tuple[Path, np.ndarray]:
    """``Gather(table, ids)`` with the table in ``model.onnx.data``, written and fsynced as a slot's files are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", WIDTH])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    root.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for name in ("model.onnx", "model.onnx.data"):
        fd = os.open(root / name, os.O_RDONLY)
        os.fsync(fd)  # clean pages: what the page cache may drop
        os.close(fd)
    return root / "model.onnx", table


def test_a_gather_over_mapped_weights_keeps_only_the_rows_it_reads_resident(tmp_path: Path) -> None:
    path, table = _gather_model(tmp_path / "bundle")
    data = mapped.data_files(path)
    assert data == [tmp_path / "bundle" / "model.onnx.data"]
    session = load_session(path, threads=1)
    regions = mapped.mappings_of(data)
    assert regions, "onnxruntime copied the weights instead of mapping the verified file"
    ids = np.array([3, 700, 701, 4000, 8191, 5000, 1200, 2222], dtype=np.int64)
    for _ in range(3):
        rows = session.run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(rows, table[ids])  # the bytes the file holds, read in place
    resident = sum(_resident_kib(a, b) for a, b in regions)
    table_kib = table.nbytes // 1024
    # 8 rows of 1 KiB: a page or two each, not the table (measured: 28 KiB; 448 KiB with read-ahead,
    # the whole table when its pages were cached in large folios)
    assert resident <= 16 * len(ids), f"{resident} KiB of the {table_kib} KiB table resident"


def test_given_back_pages_come_back_unchanged_and_written_mappings_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "pages.bin"
    content = np.random.default_rng(1).integers(0, 256, 4 * 1024 * 1024, dtype=np.uint8).tobytes()
    path.write_bytes(content)
    with open(path, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cow = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and written: copied pages
    try:
        assert sum(ro[i] for i in range(0, len(ro), 4096)) >= 0  # touch every page
        cow[0:5] = b"KEEP!"
        ro_addr = mapped.mappings_of([path])
        assert len(ro_addr) == 2
        before = {r: _resident_kib(*r) for r in ro_addr}
        assert max(before.values()) >= 4000
        assert release_file_pages() > 0
        assert release_file_pages(min_interval_s=60) == 0, "a second call that soon should do nothing"
        after = {r: _resident_kib(*r) for r in ro_addr}
        assert min(after.values()) == 0, "the read-only mapping's pages were not given back"
        assert max(after.values()) > 0, "the written (copy-on-write) mapping must keep its pages"
        assert ro[:] == content, "a page came back with other bytes"
        assert cow[0:5] == b"KEEP!" and cow[5:] == content[5:]
    finally:
        ro.close()
        cow.close()


def test_only_clean_read_only_file_mappings_are_chosen() -> None:
    smaps = "\n".join(
        [
            "7f0000000000-7f0000002000 r-xp 00000000 fd:01 11 /usr/lib/libx.so",
            "Rss:                   8 kB",
            "Anonymous:             0 kB",
            "7f0000002000-7f0000003000 r--p 00002000 fd:01 11 /usr/lib/libx.so",
            "Rss:                   4 kB",
            "Anonymous:             4 kB",  # relocated, then made read-only: its pages are copies
            "7f0000003000-7f0000004000 rw-p 00003000 fd:01 11 /usr/lib/libx.so",
            "Rss:                   4 kB",
            "Anonymous:             0 kB",
            "7f0000004000-7f0000005000 r--p 00000000 00:00 0 ",
            "Rss:                   4 kB",
            "Anonymous:             4 kB",
            "7f0000005000-7f0000006000 r--p 00000000 00:00 0 [vvar]",
            "Rss:                   4 kB",
            "Anonymous:             0 kB",
            "7f0000006000-7f0000007000 r--s 00000000 fd:01 12 /data/model.onnx.data",
            "Rss:                   0 kB",
            "Anonymous:             0 kB",
        ]
    )
    assert _clean_read_only_mappings(smaps) == [(0x7F0000000000, 0x7F0000002000, 8192)]
