"""Process and host measurements from /proc and the standard library (no psutil on devices)."""

from __future__ import annotations

import glob
import os
import platform
import resource
import shutil
import time
from importlib import metadata
from pathlib import Path

from agent.protocol.messages import HardwareProfile

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def _onnxruntime() -> tuple[str | None, list[str]]:
    try:
        version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None, []
    try:
        import onnxruntime  # heavy: only imported here and where models run

        return version, list(onnxruntime.get_available_providers())
    except Exception:  # a broken install must not stop the agent from reporting
        return version, []


def hardware_profile(data_dir: str | os.PathLike[str] | None = None) -> HardwareProfile:
    """Describe this machine for the birth message."""
    ort_version, providers = _onnxruntime()
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
