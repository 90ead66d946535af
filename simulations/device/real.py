"""A virtual device that runs real onnxruntime on real files (a profile's ``real_onnx`` devices).

Everything a real agent does on its deployment side is real here: slots are directories under the
simulation's data directory (``DiskSlotStorage``, written chunk by chunk and fsynced), the self-test loads
the model with onnxruntime and runs it, the switch moves the pointer file, and live inference runs the
active pipeline in a thread of its own at the profile's rate, offering each record to the shadow tap.
Only the hardware profile it reports is the scenario's.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from agent.deploy.driver import DeploymentDriver
from agent.inference.host import ModelHost
from agent.telemetry.stats import InferenceCounters
from simulations.device.behaviour import Serving
from simulations.device.virtual import VirtualDevice, WorkerEnv
from simulations.plan import DeviceSpec
from wire.messages import ModelRef

log = logging.getLogger(__name__)

SAMPLE_TEXTS = (
    "the pump on the north line is running fine this morning",
    "valve report is bad and the motor sounds awful",
    "pressure level is ok and flow is good today",
    "alarm signal from the east station the sensor is broken",
    "great reading from the second pump happy with the heat",
    "noise at the west valve was sad yesterday evening",
)


class RealOnnxDevice(VirtualDevice):
    """``VirtualDevice`` with disk slots, onnxruntime and a live inference thread."""

    def __init__(self, spec: DeviceSpec, env: WorkerEnv, on_fault: Any = None) -> None:
        super().__init__(spec, env, on_fault)
        self.host = ModelHost(threads=1)
        self.root = env.data_dir / spec.id
        self._stop_inference: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _make_driver(self) -> DeploymentDriver:
        driver = DeploymentDriver.open(
            self.spec.id,
            self.root,
            self.host,
            self.env.key_file,
            post=self.loop.call_soon_threadsafe,
            emit=self._execute,
            config=self.env.deploy_config,
            clock=self.now,
        )
        self.storage = driver.manager.storage  # type: ignore[assignment]  # the disk slots are the truth
        self.records = driver.manager.records  # type: ignore[assignment]
        return driver

    def boot(self) -> None:
        super().boot()
        self.counters = InferenceCounters()
        self._last_total = 0
        stop = threading.Event()
        self._stop_inference = stop
        self._thread = threading.Thread(
            target=self._infer, args=(stop, self.counters), daemon=True, name=f"infer-{self.spec.id}"
        )
        self._thread.start()

    def _halt_inference(self) -> None:
        if self._stop_inference is not None:
            self._stop_inference.set()
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None
        old = self.host.switch(None)  # RAM is gone: nothing serves until the next boot loads it again
        del old

    def power_loss(self, down_s: float) -> None:
        self._halt_inference()
        super().power_loss(down_s)

    def shutdown(self, final: bool = True) -> Any:
        self._halt_inference()
        return super().shutdown(final)

    def _infer(self, stop: threading.Event, counters: InferenceCounters) -> None:
        rng = random.Random(self.spec.id)
        period = 1.0 / self.spec.inference_rate if self.spec.inference_rate > 0 else 1.0
        while not stop.wait(period):
            loaded = self.host.acquire()
            if loaded is None:
                continue
            record = {"text": rng.choice(SAMPLE_TEXTS)}
            try:
                start = time.perf_counter()
                result = loaded.pipeline.run([record])[0]
                ms = (time.perf_counter() - start) * 1000.0
                counters.record(ms)
                if isinstance(result, dict) and isinstance(result.get("label"), str):
                    counters.record_label(result["label"])
                if self.driver is not None:
                    self.driver.shadow.offer(record, result, ms)
            except Exception:  # a model failing on live input is data (an error), never a crash
                counters.record_error()
            finally:
                self.host.release(loaded)

    def _current(self) -> Serving | None:
        loaded = self.host.current()
        if loaded is None or loaded.ref is None:
            return None
        ref: ModelRef = loaded.ref
        slot = self.storage.active_slot()
        meta = self.storage.meta(slot) if slot is not None else None
        need = meta.manifest.requirements.min_ram_bytes if meta is not None else 0
        return Serving(ref.model, ref.version, ref.variant, loaded.artifact_id, int(need / 1.25))

    def _sample(self, interval_s: float) -> Any:
        self.serving = self._current()
        return super()._sample(interval_s)

    def _simulated(self) -> bool:
        return False
