"""Weights onnxruntime memory-maps: keep only the pages a model reads resident (issue 19).

A graph whose initializers live in an external-data file (the registry's int8 variants: ``model.onnx`` +
``model.onnx.data``) is not copied into onnxruntime's heap on the CPU: onnxruntime maps each initializer
from the file and uses the mapping directly. Weights it prepacks (the MatMul weights) are copied into its
own buffers at load and their mapping is released; what stays mapped is read in place, chiefly the word
embedding table, of which a Gather reads only the rows of the tokens it sees.

Two kernel defaults would still make the whole table resident after a few hundred distinct tokens: the
file's pages sit in the page cache in large folios (written by the download, read by the hash check), and
a fault maps the whole folio; and a fault reads ahead. So before the session is made, the graph's data
files leave the page cache (``POSIX_FADV_DONTNEED``: they are on disk and verified, nothing is lost),
and once it is made its mappings are marked ``MADV_RANDOM`` (no read-ahead): a token's
row then costs one 4 KiB page. Both are hints; where the platform lacks them nothing changes but RSS.

What the session reads is still exactly the verified file: the slot holds only files the signed manifest
lists, each hashed before the model loads (every byte of the data file, as of the graph), and onnxruntime
refuses external-data paths outside the graph's directory. Unlike the graph, which is read once at load,
the mapping is read for the session's life: like the rest of the slot, it relies on nothing but the agent
writing its data directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
from pathlib import Path

from agent.telemetry.system import madvise_fn

log = logging.getLogger(__name__)

#: Names exporters and the registry give external-data files.
_DATA_SUFFIXES = (".data", ".onnx_data")


def data_files(graph: Path) -> list[Path]:
    """The external-data files next to ``graph`` (by name: what onnxruntime may map for it)."""
    folder = Path(graph).parent
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_DATA_SUFFIXES))
    except OSError:
        return []


def evict(paths: list[Path]) -> int:
    """Drop ``paths`` from the page cache (clean pages only); the number of files advised."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        except OSError as exc:
            log.debug("cannot evict %s from the page cache: %s", path, exc)
        finally:
            os.close(fd)
    return done


def mappings_of(paths: list[Path]) -> list[tuple[int, int]]:
    """This process's mappings (start, end) of the files ``paths`` (from ``/proc/self/maps``)."""
    names = {str(Path(p).resolve()) for p in paths}
    found: list[tuple[int, int]] = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in names:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end))
    return found


def read_randomly(paths: list[Path]) -> int:
    """Mark this process's mappings of ``paths`` ``MADV_RANDOM``; the number of mappings advised."""
    advice = getattr(mmap, "MADV_RANDOM", None)
    fn = madvise_fn() if advice is not None else None
    if fn is None:
        return 0
    done = 0
    for start, end in mappings_of(paths):
        if fn(start, end - start, advice) == 0:
            done += 1
        else:
            log.debug("madvise(MADV_RANDOM) failed: errno %d", ctypes.get_errno())
    return done
