"""Runner: ``python -m benchmarks NAME [--quick]``."""

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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="a smaller run (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where to keep the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        module = importlib.import_module(BENCHMARKS[args.name])
    except ModuleNotFoundError as exc:
        print(json.dumps({"benchmark": args.name, "error": f"not available: {exc}"}))
        return 2
    started = time.time()
    result = {"benchmark": args.name, "quick": args.quick, **module.run(quick=args.quick)}
    result["wall_s"] = round(time.time() - started, 2)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}{'-quick' if args.quick else ''}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
