"""The worker process of one derive step: ``python -m controller.jobs.worker <step_dir>``.

``step_dir/step.json`` says what to run (kind, params, the input checkpoint, the data file, threads); the
algorithm (``controller.registry.shrink``) writes its checkpoint to ``step_dir/out``, keeps resumable state in
``step_dir/work`` and the worker writes ``step_dir/report.json`` last. Progress goes to stdout as JSON lines
(``{"progress": 0.4, "message": "epoch 2/3"}``; then ``{"report": {...}}`` or ``{"error": "..."}``).

Exit status: 0 done, 2 the step refused its input (the error line says why), 3 cancelled (SIGTERM: the step
stops at its next safe point, its state saved), anything else a crash. Before anything else the process shuts
itself off the network: an audit hook refuses every socket connection and name lookup, and the Hugging Face
libraries are told they are offline. Started by ``controller.jobs.service`` with the limits of ``limits.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

EXIT_REFUSED = 2
EXIT_CANCELLED = 3

#: audit events a worker refuses: it has no business on any network, loopback included
_NETWORK_EVENTS = frozenset(
    {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto"}
)


class NetworkRefused(PermissionError):
    """A worker tried to reach the network."""


def _refuse_network(event: str, args: tuple[Any, ...]) -> None:
    if event in _NETWORK_EVENTS:
        raise NetworkRefused(f"derive workers never reach the network ({event} {args[1:2]!r} refused)")


def seal() -> None:
    """Cut this process off the network for good (an audit hook cannot be removed) and make the Hugging Face
    libraries work offline."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    sys.addaudithook(_refuse_network)


def emit(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def check_network(host: str, port: int) -> dict[str, str]:
    """What happens when this (sealed) process connects to ``host:port`` and looks a name up: for the tests and
    for an operator who wants to see it (``python -m controller.jobs.worker --check-network HOST PORT``)."""
    out: dict[str, str] = {}
    try:
        socket.create_connection((host, port), timeout=2).close()
        out["connect"] = "connected"
    except OSError as exc:
        out["connect"] = f"refused: {exc}"
    try:
        socket.getaddrinfo("localhost", port)
        out["getaddrinfo"] = "resolved"
    except OSError as exc:
        out["getaddrinfo"] = f"refused: {exc}"
    return out


#: set by SIGTERM (the controller's cancel, or its shutdown): the step stops at its next safe point
_stop = {"requested": False}


def _on_term(_signum: int, _frame: Any) -> None:
    _stop["requested"] = True


def run_step(step_dir: Path) -> int:
    from controller.registry import shrink

    spec = json.loads((step_dir / "step.json").read_text())
    report_path = step_dir / "report.json"
    out = step_dir / "out"
    if report_path.exists() and out.is_dir():  # done before a restart: nothing to run again
        emit(report=json.loads(report_path.read_text()))
        return 0
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or fraction >= 1.0:
            last[0] = now
            emit(progress=round(min(max(fraction, 0.0), 1.0), 4), message=message[:300])

    threads = int(spec.get("threads", 1))
    ctx = shrink.StepContext(
        work_dir=step_dir / "work",
        progress=progress,
        cancelled=lambda: _stop["requested"],
        threads=threads,
        seed=int(spec.get("seed", 0)),
    )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    kind, params = spec["kind"], spec["params"]
    source = Path(spec["input"])
    data = Path(spec["data"]) if spec.get("data") else None
    sha = spec.get("data_sha256")
    try:
        if kind == "distill":
            assert data is not None
            texts, sha = shrink.read_texts(data)
            report = shrink.distill(source, out, ctx, texts=texts, data_sha256=sha, **params)
        elif kind == "prune":
            recover = params.pop("recover", True)
            texts_or_none = shrink.read_texts(data)[0] if recover and data is not None else None
            report = shrink.prune(
                source, out, ctx, recover_texts=texts_or_none, data_sha256=sha if texts_or_none else None, **params
            )
        elif kind == "finetune":
            assert data is not None
            examples, sha = shrink.read_labeled(data)
            report = shrink.finetune(source, out, ctx, examples=examples, data_sha256=sha, **params)
        else:
            emit(error=f"a {kind} step does not run in a worker")
            return EXIT_REFUSED
    except shrink.Cancelled:
        emit(cancelled=True)
        return EXIT_CANCELLED
    except shrink.ShrinkError as exc:
        emit(error=str(exc))
        return EXIT_REFUSED
    except ModuleNotFoundError as exc:
        emit(
            error=f"a {kind} step needs the Python package {exc.name!r}, missing on the controller: pip install"
            " 'slmfleet[convert]'"
        )
        return EXIT_REFUSED
    except MemoryError:
        emit(error="the step ran out of memory (the jobs_memory_mb limit): raise it, or use smaller batches")
        return EXIT_REFUSED
    result = report.to_dict()
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, report_path)
    emit(report=result)
    return 0


def main(argv: list[str] | None = None) -> int:
    seal()
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--check-network":
        emit(**check_network(args[1], int(args[2])))
        return 0
    if len(args) != 1:
        sys.stderr.write("usage: python -m controller.jobs.worker STEP_DIR | --check-network HOST PORT\n")
        return 64
    signal.signal(signal.SIGTERM, _on_term)  # before the slow imports: a stop while starting is a clean one
    signal.signal(signal.SIGINT, _on_term)
    try:
        import torch
    except ModuleNotFoundError as exc:
        emit(
            error=f"derive jobs need the convert extra on the controller ({exc.name} is missing): pip install"
            " 'slmfleet[convert]'"
        )
        return EXIT_REFUSED
    if _stop["requested"]:
        emit(cancelled=True)
        return EXIT_CANCELLED

    threads = int(json.loads((Path(args[0]) / "step.json").read_text()).get("threads", 1))
    torch.set_num_threads(max(1, threads))
    return run_step(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
