"""Runner: ``python -m benchmarks NAME [--quick]``.

``python -m benchmarks ingest --broker nats-cluster --replicas 3``: ingest through a 3-node NATS cluster."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "ingest": "benchmarks.ingest",
    "registry": "benchmarks.registry",
    "delivery": "benchmarks.delivery",
    "agent": "benchmarks.agent",
    "rollout": "benchmarks.rollout",
    "simulate": "benchmarks.simulate",
    "dashboard": "benchmarks.dashboard",
    "security": "benchmarks.security",
    "floors": "benchmarks.floors",
    "hardening": "benchmarks.hardening",
    "gates": "benchmarks.gates",
    "failover": "benchmarks.failover",
    "artifacts": "benchmarks.artifacts",
    "device": "benchmarks.device",
    "links": "benchmarks.links",
    "delta": "benchmarks.delta",
    "fidelity": "benchmarks.fidelity",
    "shrink": "benchmarks.shrink",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="a smaller run (smoke test)")
    parser.add_argument(
        "--broker",
        choices=["embedded", "nats-cluster"],
        default="embedded",
        help="ingest: the embedded broker (default) or a 3-node NATS cluster with controller replicas",
    )
    parser.add_argument("--replicas", type=int, default=3, help="ingest --broker nats-cluster: controller replicas")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=["happy-path", "bad-model", "flaky-network", "low-ram-int4"],
        help="fidelity: only this shipped scenario (repeat for several; default all four)",
    )
    parser.add_argument("--runs", type=int, help="fidelity: runs of each kind (default 2, --quick 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where to keep the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    name, options = BENCHMARKS[args.name], {}
    if args.name == "ingest" and args.broker == "nats-cluster":
        name, options = "benchmarks.ingest_cluster", {"replicas": args.replicas}
    if args.name == "fidelity" and (args.scenario or args.runs):
        options = {"scenarios": tuple(args.scenario or ()), "runs": args.runs}
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        print(json.dumps({"benchmark": args.name, "error": f"not available: {exc}"}))
        return 2
    started = time.time()
    result = {"benchmark": args.name, "quick": args.quick, **module.run(quick=args.quick, **options)}
    result["wall_s"] = round(time.time() - started, 2)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("-nats-cluster" if args.name == "ingest" and options else "")
    if args.name == "fidelity" and args.scenario:
        stem += "-" + "-".join(args.scenario)
    (args.out / f"{stem}{'-quick' if args.quick else ''}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
