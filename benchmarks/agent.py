"""The device agent serving models, against bare runtimes on the same models and inputs in the same run.

* Pipeline overhead: records/s of the agent process (JSON-lines file in, results file out: reading,
  queueing, micro-batching, tokenizing, post-processing, writing) over bare onnxruntime
  ``session.run`` on the same tensors in batches of the same shapes (MiniLM int8 and DistilBERT int8;
  goal: overhead <= 5%). fp32 runs too, for int8's speed-up through the agent.
* RSS of the agent process: idle without a model (goal <= 50 MiB) and serving MiniLM int8 (<= 120 MiB).
* Generation: tokens/s of the agent process against onnxruntime-genai's own loop on the same model and
  prompt ids (goal >= 0.9), serving the bundle with its own runtime (onnxruntime-genai) and with the
  agent's plain onnxruntime loop; plus ``tokens_per_second_ratio`` (the loops alone, no service).

Overhead is given twice: in CPU time per record (every thread of the process counted; what serving
costs the device, and what a busy shared machine disturbs least) and in wall-clock records/s.

Every measurement runs in a fresh process (the agent, or a baseline tool) with the same thread setting,
after a warm pass over the same inputs (the agent reads them twice; its rate is taken over the second
pass). The machine may be shared, so the baseline and the agent alternate in rounds and each figure is
the median over the rounds of the per-round ratio; the per-round ratios are in the output too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import start_broker, wait_for
from controller.broker.embedded import EmbeddedBroker, free_port

MIB = 1024 * 1024
THREADS = 0  # onnxruntime decides (all cores), for the agent and the baselines alike
MAX_BATCH = 16
_VOCABULARY = (
    "the pump valve sensor reading pressure flow level alarm signal report north south station line motor"
    " heat noise morning evening today yesterday was were is are has have will not very high low normal"
    " failed again after maintenance replaced checked operator technician warehouse gateway controller"
)
_WORDS = _VOCABULARY.split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 30))) for _ in range(n)]


#: what an agent serving a model imports: byte-compiled into the cache before the first measurement
_WARM_IMPORTS = (
    "agent.runtime.service, agent.cli, numpy, onnxruntime, tokenizers, agent.inference.pipelines.embeddings,"
    " agent.inference.pipelines.classification, agent.inference.pipelines.anomaly"
)


@functools.cache
def _pycache() -> str:
    """A byte-code cache of the benchmark's own (``PYTHONPYCACHEPREFIX``), filled before the first agent starts.

    A device runs the agent as pip installed it, byte-compiled. Run from a source tree with
    PYTHONDONTWRITEBYTECODE set (as on the machines these figures come from), every start compiled every
    module of the repository again, and the compiler's freed memory stayed in the heap: ~1-2 MiB more idle
    RSS than an installed agent has. The cache lives outside the tree; modules found nowhere in it are
    compiled once and written there.
    """
    prefix = Path(tempfile.gettempdir()) / f"slmfleet-bench-pycache-{os.getuid()}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-c", f"import {_WARM_IMPORTS}"], env=env, check=False, capture_output=True)
    return str(prefix)


_REPO = str(Path(__file__).resolve().parents[1])


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
    env["PYTHONPYCACHEPREFIX"] = _pycache()
    return env


def _tool(*args: object, timeout: float = 1800) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {done.stderr.strip()[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class AgentRun:
    """``slmfleet agent`` as a child process with a private data directory."""

    def __init__(
        self,
        tmp: Path,
        broker: EmbeddedBroker,
        name: str,
        *args: str,
        http: bool = False,
        threads: int = THREADS,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        """``preexec`` runs in the child before the agent starts (``benchmarks.device``: pin it, limit it)."""
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if http else 0
        endpoint = ["--http-port", str(self.port)] if http else []
        self.log = open(self.dir / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        self._samples: list[tuple[float, float]] = []  # (wall clock, CPU seconds of the agent)
        self._sampling = threading.Event()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "agent.cli", "agent", "--broker", broker.url, "--device-id", f"bench-{name}"),
                *("--data-dir", str(self.dir / "data"), *endpoint, "--threads", str(threads)),
                *("--telemetry-interval", "5", "--log-level", "WARNING", *args),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
            preexec_fn=preexec,  # noqa: PLW1509 - benchmark children only; no threads started here
        )
        self._sampler = threading.Thread(target=self._sample_cpu, daemon=True)
        self._sampler.start()

    def _sample_cpu(self) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{self.proc.pid}/stat")
        while not self._sampling.is_set():
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return
            self._samples.append((time.time(), (int(fields[11]) + int(fields[12])) / ticks))
            time.sleep(0.02)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the agent used between two wall-clock times (interpolated between samples)."""
        # on a loaded machine the sampler may lag: give it a moment to pass ``end``
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: bool(self._samples) and self._samples[-1][0] >= end, 5, interval=0.05)
        samples = list(self._samples)

        def at(t: float) -> float:
            if not samples:
                raise ValueError("no CPU samples of the agent at all")
            if t <= samples[0][0]:
                return samples[0][1]
            for (t0, c0), (t1, c1) in zip(samples, samples[1:], strict=False):
                if t0 <= t <= t1:
                    return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
            return samples[-1][1]  # the process ended (or the sampler stopped) before t: its last reading

        return at(end) - at(start)

    def health(self) -> dict[str, Any] | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=2).json()
        except httpx.HTTPError:
            return None

    def rss(self, seconds: float = 2.0) -> dict[str, int]:
        """The largest VmRSS seen over ``seconds`` (telemetry ticks and the like included), and VmHWM."""
        samples = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples.append(_status(self.proc.pid))
            time.sleep(0.1)
        return {"rss_bytes": max(s["VmRSS"] for s in samples), "peak_rss_bytes": samples[-1]["VmHWM"]}

    def stop(self) -> None:
        self._sampling.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _second_pass(results: list[dict[str, Any]], n: int, weight: str | None = None) -> tuple[float, float, float]:
    """The measured window of the second of two passes over ``n`` inputs: (amount, start, end).

    ``amount`` counts records (or sums ``weight``, e.g. tokens). Results of one micro-batch share a
    timestamp, so the window starts at the first batch boundary in the second pass: from the end of the
    batch before it to the end of the last batch.
    """
    ordered = sorted(results, key=lambda r: r["seq"])
    ts = [r["ts"] for r in ordered]
    start = next(i for i in range(n, len(ts)) if ts[i] > ts[i - 1])
    later = ordered[start:]
    amount = float(sum(r["result"][weight] for r in later) if weight else len(later))
    return amount, ts[start - 1], ts[-1]


def _agent_throughput(tmp: Path, broker: EmbeddedBroker, name: str, bundle: str, texts: list[str]) -> dict[str, Any]:
    inputs = tmp / f"{name}.jsonl"
    inputs.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts + texts)
    )  # a warm pass, then the measured one
    out = tmp / name / "results.jsonl"
    run = AgentRun(
        tmp, broker, name, "--model", bundle, "--input", str(inputs), "--results", str(out),
        "--max-batch", str(MAX_BATCH), "--queue-size", "4096",
    )  # fmt: skip
    try:
        wait_for(lambda: len(_results(out)) >= 2 * len(texts) or run.proc.poll() is not None, 1800, interval=0.2)
        results = _results(out)
        if len(results) < 2 * len(texts):
            log = (run.dir / "agent.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"agent {name} stopped early (exit {run.proc.poll()}): {log}")
        errors = sum(1 for r in results if "error" in r["result"])
        memory = run.rss(1.0)
        amount, start, end = _second_pass(results, len(texts))
        cpu = run.cpu_between(start, end)
    finally:
        run.stop()
    return {
        "records_per_s": amount / (end - start),
        "cpu_ms_per_record": 1000 * cpu / amount,
        "errors": errors,
        **memory,
    }


def _idle_rss(tmp: Path, broker: EmbeddedBroker) -> dict[str, Any]:
    run = AgentRun(tmp, broker, "idle", http=True)  # the endpoint is part of an idle agent's footprint
    try:
        wait_for(lambda: (h := run.health()) is not None and h["broker_connected"], 60, interval=0.1)
        memory = run.rss(3.0)
        modules = Path(f"/proc/{run.proc.pid}/maps").read_text()
    finally:
        run.stop()
    return {**memory, "onnxruntime_loaded": "onnxruntime" in modules, "numpy_loaded": "numpy" in modules}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _encoders(tmp: Path, broker: EmbeddedBroker, made: dict[str, str], n: int, rounds: int) -> dict[str, Any]:
    texts = _texts(n)
    text_file = tmp / "texts.txt"
    text_file.write_text("\n".join(texts) + "\n")
    out: dict[str, Any] = {}
    for name in ("minilm-int8", "distilbert-int8", "minilm-fp32", "distilbert-fp32"):
        bare, served = [], []
        for i in range(rounds):  # alternate, so a busy moment of the machine hits both alike
            bare.append(_tool("benchmarks.tools.ort_baseline", "encoder", made[name], text_file, MAX_BATCH, THREADS))
            served.append(_agent_throughput(tmp, broker, f"{name}-{i}", made[name], texts))
        ratios = [a["records_per_s"] / b["records_per_s"] for a, b in zip(served, bare, strict=True)]
        cpu_ratios = [a["cpu_ms_per_record"] / b["cpu_ms_per_record"] for a, b in zip(served, bare, strict=True)]
        cpu_tokenized = [
            a["cpu_ms_per_record"] / b["with_tokenizer_cpu_ms_per_record"] for a, b in zip(served, bare, strict=True)
        ]
        tokenized = [a["records_per_s"] / b["with_tokenizer_records_per_s"] for a, b in zip(served, bare, strict=True)]
        out[name] = {
            "baseline_session_run_records_per_s": round(_median([b["records_per_s"] for b in bare]), 1),
            "baseline_with_tokenizer_records_per_s": round(
                _median([b["with_tokenizer_records_per_s"] for b in bare]), 1
            ),
            "agent_records_per_s": round(_median([a["records_per_s"] for a in served]), 1),
            "baseline_cpu_ms_per_record": round(_median([b["cpu_ms_per_record"] for b in bare]), 3),
            "agent_cpu_ms_per_record": round(_median([a["cpu_ms_per_record"] for a in served]), 3),
            "overhead_cpu": round(_median(cpu_ratios) - 1, 4),
            "overhead_cpu_per_round": [round(r - 1, 4) for r in cpu_ratios],
            "overhead_cpu_vs_tokenized_baseline": round(_median(cpu_tokenized) - 1, 4),
            "overhead_wall": round(1 - _median(ratios), 4),
            "overhead_wall_per_round": [round(1 - r, 4) for r in ratios],
            "overhead_wall_vs_tokenized_baseline": round(1 - _median(tokenized), 4),
            "agent_rss_mib": round(_median([a["rss_bytes"] for a in served]) / MIB, 1),
            "agent_peak_rss_mib": round(max(a["peak_rss_bytes"] for a in served) / MIB, 1),
            "rows_per_session_run": bare[0]["rows_per_run"],
            "errors": sum(a["errors"] for a in served),
        }
    for family in ("minilm", "distilbert"):
        int8, fp32 = out[f"{family}-int8"], out[f"{family}-fp32"]
        out[f"{family}_int8_speedup_through_agent"] = {
            "cpu": round(fp32["agent_cpu_ms_per_record"] / int8["agent_cpu_ms_per_record"], 2),
            "wall": round(int8["agent_records_per_s"] / fp32["agent_records_per_s"], 2),
        }
    return out


def _generation(tmp: Path, broker: EmbeddedBroker, bundle: str, n_prompts: int, rounds: int) -> dict[str, Any]:
    from wire.manifest import RunSpec, Runtime

    max_new = 64
    prompts = _texts(n_prompts, seed=1)
    prompt_file = tmp / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    plain = tmp / "llama-plain-loop"
    plain.mkdir(exist_ok=True)
    spec = RunSpec.model_validate_json((Path(bundle) / "slmfleet.json").read_text())
    for f in Path(bundle).iterdir():  # the same graph, served by the agent's own onnxruntime loop
        if f.name != "slmfleet.json" and not (plain / f.name).exists():
            (plain / f.name).symlink_to(f)
    (plain / "slmfleet.json").write_text(spec.model_copy(update={"runtime": Runtime.ONNXRUNTIME}).model_dump_json())

    def served(name: str, root: Path | str) -> tuple[float, float]:
        inputs = tmp / f"{name}.jsonl"
        records = [{"prompt": p, "max_new_tokens": max_new} for p in prompts + prompts]  # warm pass, measured pass
        inputs.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = tmp / name / "results.jsonl"
        run = AgentRun(
            tmp, broker, name, "--model", str(root), "--input", str(inputs), "--results", str(out), "--max-batch", "1"
        )
        try:
            wait_for(lambda: len(_results(out)) >= len(records) or run.proc.poll() is not None, 1800, interval=0.2)
            results = _results(out)
            if len(results) < len(records) or any("error" in r["result"] for r in results):
                log = (run.dir / "agent.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"generation through the agent failed (exit {run.proc.poll()}): {log}")
            tokens, start, end = _second_pass(results, len(prompts), "tokens")
            cpu = run.cpu_between(start, end)
        finally:
            run.stop()
        return tokens / (end - start), tokens / cpu

    base, agent_genai, agent_plain = [], [], []
    for i in range(rounds):
        measured = _tool("benchmarks.tools.ort_baseline", "genai", bundle, prompt_file, max_new, THREADS)
        base.append((measured["tokens_per_s"], measured["tokens_per_cpu_s"]))
        agent_genai.append(served(f"gen-genai-{i}", bundle))
        agent_plain.append(served(f"gen-plain-{i}", plain))
    genai_rates = [b[0] for b in base]
    genai_ratios = [a[0] / b[0] for a, b in zip(agent_genai, base, strict=True)]
    plain_ratios = [a[0] / b[0] for a, b in zip(agent_plain, base, strict=True)]
    genai_cpu_ratios = [a[1] / b[1] for a, b in zip(agent_genai, base, strict=True)]
    plain_cpu_ratios = [a[1] / b[1] for a, b in zip(agent_plain, base, strict=True)]
    result: dict[str, Any] = {
        "model": "llama-small seed (4 layers, hidden 256), fp32, onnxruntime-genai model builder",
        "prompts": n_prompts,
        "max_new_tokens": max_new,
        "baseline_genai_loop_tokens_per_s": round(_median(genai_rates), 1),
        "agent_genai_runtime_tokens_per_s": round(_median([a[0] for a in agent_genai]), 1),
        "agent_plain_loop_tokens_per_s": round(_median([a[0] for a in agent_plain]), 1),
        "ratio_agent_genai_runtime": round(_median(genai_ratios), 3),
        "ratio_agent_plain_loop": round(_median(plain_ratios), 3),
        "ratio_per_cpu_s_agent_genai_runtime": round(_median(genai_cpu_ratios), 3),
        "ratio_per_cpu_s_agent_plain_loop": round(_median(plain_cpu_ratios), 3),
        "ratio_per_round_genai_runtime": [round(r, 3) for r in genai_ratios],
        "ratio_per_round_plain_loop": [round(r, 3) for r in plain_ratios],
        "goal_ratio": 0.9,
    }
    try:
        from controller.registry.convert import ExportedBundle
        from controller.registry.convert.evaluate_generation import tokens_per_second_ratio

        loops = tokens_per_second_ratio(ExportedBundle(Path(bundle), spec), max_new_tokens=max_new, threads=THREADS)
        result["loop_only_ratio"] = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in loops.items() if k != "agent_graph"
        }
    except ImportError as exc:
        result["loop_only_ratio"] = f"not available: {exc}"
    return result


def run(quick: bool = False) -> dict[str, Any]:
    n = 150 if quick else 400
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="slmfleet-bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        made = {k: str(v) for k, v in _tool("benchmarks.tools.agent_bundles", tmp / "bundles", timeout=3600).items()}
        build_s = time.perf_counter() - started
        broker = start_broker(tmp / "broker")
        try:
            idle = [_idle_rss(tmp, broker) for _ in range(rounds)]
            encoders = _encoders(tmp, broker, made, n, rounds)
            generation = _generation(tmp, broker, made["llama-genai"], 6 if quick else 12, rounds)
        finally:
            broker.stop()
    idle_rss = statistics.median(s["rss_bytes"] for s in idle)
    minilm = encoders["minilm-int8"]
    return {
        "records": n,
        "rounds": rounds,
        "max_batch": MAX_BATCH,
        "threads": THREADS or f"onnxruntime default ({os.cpu_count()} cores)",
        "bundle_build_s": round(build_s, 1),
        "overhead_cpu_minilm_int8": minilm["overhead_cpu"],
        "overhead_cpu_distilbert_int8": encoders["distilbert-int8"]["overhead_cpu"],
        "overhead_wall_minilm_int8": minilm["overhead_wall"],
        "overhead_wall_distilbert_int8": encoders["distilbert-int8"]["overhead_wall"],
        "load_average_at_end": os.getloadavg()[0],
        "goal_overhead": 0.05,
        "rss_idle_no_model_mib": round(idle_rss / MIB, 1),
        "goal_rss_idle_mib": 50,
        "idle_onnxruntime_loaded": any(s["onnxruntime_loaded"] for s in idle),
        "idle_numpy_loaded": any(s["numpy_loaded"] for s in idle),
        "rss_serving_minilm_int8_mib": minilm["agent_rss_mib"],
        "peak_rss_serving_minilm_int8_mib": minilm["agent_peak_rss_mib"],
        "goal_rss_serving_minilm_int8_mib": 120,
        "encoders": encoders,
        "generation": generation,
    }
