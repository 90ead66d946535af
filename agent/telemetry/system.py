"""Process and host measurements from /proc and the standard library (no psutil on devices)."""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from wire.messages import HardwareProfile

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Any:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33 (musl, macOS): RSS only
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


def heap_in_use_bytes() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc), or None where that is not known.

    Unlike RSS it does not hide a new allocation behind memory a previous model freed but the
    allocator kept, so a model's footprint measured with it is right after a switch too.
    """
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks + info.hblkhd)


@functools.cache
def _malloc_trim() -> Any:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_size_t]
    return fn


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``); False where unsupported.

    Loading a model parses its graph into buffers that are freed again; glibc keeps such memory for
    reuse, so RSS would stay ~10 MiB above what the process uses (measured with MiniLM int8).
    """
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def madvise_fn() -> Any:
    """libc's ``madvise`` through ctypes, or None where there is none (not Linux/glibc)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


#: madvise advice (linux/mman.h): drop the range's page-table entries
_MADV_DONTNEED = 4


def _clean_read_only_mappings(smaps: str) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of the file mappings in ``smaps`` no write can have changed.

    A mapping qualifies if it has a file, is not writable and holds no anonymous (copied-on-write)
    page: every page of it is then the file's own page in the page cache.
    """
    found: list[tuple[int, int, int]] = []
    current: list[Any] | None = None  # [start, end, eligible, rss kB, anonymous kB]

    def close() -> None:
        if current is not None and current[2] and current[3] > 0 and current[4] == 0:
            found.append((current[0], current[1], current[3] * 1024))

    for line in smaps.splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            close()
            fields = rest.split(maxsplit=4)
            start, end = (int(x, 16) for x in head.split("-"))
            path = fields[4] if len(fields) == 5 else ""
            current = [start, end, path.startswith("/") and "w" not in fields[0], 0, 0]
        elif current is not None and head == "Rss:":
            current[3] = int(rest.split()[0])
        elif current is not None and head == "Anonymous:":
            current[4] = int(rest.split()[0])
    close()
    return found


#: When ``release_file_pages`` last ran (monotonic seconds).
_last_release = -1e9


def release_file_pages(min_interval_s: float = 0.0) -> int:
    """Unmap the pages of this process's read-only file mappings; the resident bytes they held (0: unsupported).

    Loading a shared library maps far more of it than the process runs: read-ahead and the page cache's
    large folios map its code in blocks (measured: onnxruntime's library 21.5 MiB resident after a
    model loads and serves, 9 MiB of it touched again afterwards). The pages stay in the page cache: the
    next touch maps a page back (a minor fault), what is never touched again is no longer this process's,
    and the kernel can reclaim it first. Only mappings no write can have changed are advised (no
    writable mapping, none with a copied page), so no byte of the process changes: ``MADV_DONTNEED``
    on such a mapping drops nothing but page-table entries. Run once a model has loaded and warmed up,
    not periodically: the pages the process runs would only come back. With ``min_interval_s``, a call
    that soon after the last does nothing (what was mapped since is what the process runs; each call reads
    ``/proc/self/smaps``, ~5 ms of CPU).
    """
    global _last_release
    now = time.monotonic()
    if now - _last_release < min_interval_s:
        return 0
    _last_release = now
    fn = madvise_fn()
    if fn is None:
        return 0
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    released = 0
    for start, end, resident in _clean_read_only_mappings(smaps):
        if fn(start, end - start, _MADV_DONTNEED) == 0:
            released += resident
    return released


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: buffers up to this size come from the heap, not from a fresh mmap each (chunk frames are 256 KiB)
HEAP_MMAP_THRESHOLD = 1024 * 1024
#: free memory at the top of the heap kept for reuse before it is given back (malloc_trim still returns it)
HEAP_TRIM_THRESHOLD = 4 * 1024 * 1024


def tune_heap() -> bool:
    """Stop glibc from mapping and unmapping every large buffer (False where unsupported).

    Each 256 KiB chunk frame passes through a few buffers of its size. With glibc's defaults those
    are fresh mmaps, or heap memory trimmed back as soon as it is freed, so every frame faults in and
    zeroes ~64 new pages per buffer: measured in the delivery benchmark, page faults were a quarter
    of the agents' CPU. Fixed thresholds keep up to ``HEAP_TRIM_THRESHOLD`` of freed heap for reuse;
    ``trim_heap`` (each telemetry interval, after a model loads) still gives it back when idle.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.restype = ctypes.c_int
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    )


def temperature_c() -> float | None:
    """Hottest thermal zone the kernel exposes, or None where there is none."""
    best: float | None = None
    for path in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        try:
            value = int(Path(path).read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if best is None or value > best:
            best = value
    return best


class CpuMeter:
    """CPU use of this process between successive calls, in percent of one core."""

    def __init__(self) -> None:
        self._last_cpu = self._cpu()
        self._last_wall = time.monotonic()

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def percent(self) -> float:
        cpu, wall = self._cpu(), time.monotonic()
        d_cpu, d_wall = cpu - self._last_cpu, wall - self._last_wall
        self._last_cpu, self._last_wall = cpu, wall
        return max(0.0, 100.0 * d_cpu / d_wall) if d_wall > 0 else 0.0


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()[:128] or None
    except OSError:
        pass
    return None


#: Where the providers onnxruntime offers are remembered, per onnxruntime version and interpreter.
PROVIDERS_CACHE = "onnxruntime-providers.json"


def _probe_providers(timeout_s: float = 60.0) -> list[str] | None:
    """Ask a short-lived interpreter which providers onnxruntime offers.

    Importing onnxruntime costs this process ~20 MiB of RSS for the rest of its life; an agent that
    serves no model yet should not pay that just to describe itself, so a child pays it and exits.
    """
    try:
        out = subprocess.run(
            [sys.executable, "-m", "agent.telemetry.providers"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
        providers = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("cannot list onnxruntime's providers: %s", exc)
        return None
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        return None
    return providers


def onnxruntime_info(cache_dir: str | os.PathLike[str] | None = None) -> tuple[str | None, list[str]]:
    """onnxruntime's version and providers, without importing onnxruntime into this process.

    Uses the module if something already imported it; else a cache in ``cache_dir`` keyed by the
    onnxruntime version and the interpreter; else a child process (and fills the cache).
    """
    try:
        version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None, []
    loaded = sys.modules.get("onnxruntime")
    if loaded is not None:
        try:
            return version, list(loaded.get_available_providers())
        except Exception:  # a broken install must not stop the agent from reporting
            return version, []
    key = {"onnxruntime": version, "python": sys.executable}
    cache = Path(cache_dir) / PROVIDERS_CACHE if cache_dir is not None else None
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if {k: cached.get(k) for k in key} == key and isinstance(cached.get("providers"), list):
                return version, [str(p) for p in cached["providers"]]
        except (OSError, ValueError):
            pass
    providers = _probe_providers()
    if providers is None:
        return version, []
    if cache is not None:
        try:
            cache.write_text(json.dumps({**key, "providers": providers}))
        except OSError as exc:
            log.debug("cannot cache the provider list in %s: %s", cache, exc)
    return version, providers


def hardware_profile(data_dir: str | os.PathLike[str] | None = None) -> HardwareProfile:
    """Describe this machine for the birth message."""
    ort_version, providers = onnxruntime_info(data_dir)
    disk_free = None
    if data_dir is not None:
        try:
            disk_free = shutil.disk_usage(data_dir).free
        except OSError:
            disk_free = None
    return HardwareProfile(
        cpu_count=os.cpu_count() or 1,
        cpu_model=_cpu_model(),
        ram_bytes=_ram_bytes(),
        disk_free_bytes=disk_free,
        arch=platform.machine() or "unknown",
        os=f"{platform.system()} {platform.release()}"[:128],
        python=platform.python_version(),
        onnxruntime=ort_version,
        providers=providers,
    )
