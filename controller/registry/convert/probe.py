"""Run ``python -m agent.inference.probe`` on a bundle: the device pipeline measured in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from controller.registry.convert import ConversionError

__all__ = ["run_probe"]


def run_probe(kind: Literal["latency", "generation", "ratio"], job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the probe ``kind`` on ``job`` in a fresh interpreter that sees this repository; its report.

    A probe that fails, or reports an ``error``, raises ConversionError with what it said.
    """
    import agent

    repo_root = str(Path(agent.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.inference.probe", kind, job_path],
            capture_output=True,
            text=True,
            env=env,
            cwd=repo_root,
            timeout=timeout,
            check=False,
        )
    finally:
        os.unlink(job_path)
    if done.returncode != 0:
        raise ConversionError(f"measuring {job['root']} failed: {done.stderr.strip()[-2000:]}")
    report = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    if report.get("error"):
        raise ConversionError(str(report["error"]))
    return report
