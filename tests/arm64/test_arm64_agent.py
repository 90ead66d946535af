"""The agent on arm64 under emulation: deploy/install-agent.sh installed it into an arm64 Debian root
(deploy/arm64/arm64-root.sh, with the aarch64 wheels of onnxruntime, numpy, tokenizers, cryptography and
pydantic from PyPI) and it runs there under qemu-aarch64. Next to a native x86-64 agent, it connects to a
real broker and ``slmfleet up``, receives one deployment through the broadcast, self-tests, switches and
answers its HTTP endpoint with the embeddings the x86-64 agent gives, within float tolerance.

The root is cached in /var/cache/slmfleet/arm64-rootfs and built here on first use (root, apt and PyPI
reachable; 14-21 min on 2 shared cores, see the README); the test skips, saying why, where it cannot run."""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.broker.embedded import EmbeddedBroker, free_port
from tests.e2e.fleet import ControllerProc, Fleet
from tests.e2e.test_exporters_on_agents import import_export
from tests.helpers import REPO, Proc, wait_until
from tests.registry.test_exporters import reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first run builds the root (minutes)

SCRIPT = REPO / "deploy" / "arm64" / "arm64-root.sh"
CACHE = Path(os.environ.get("SLMFLEET_ARM64_CACHE", "/var/cache/slmfleet/arm64-rootfs"))
DEVICE, ARM64 = "edge-x86-64", "edge-arm64"
LAYOUT = "sentence-transformers-cls"  # a BERT encoder with its tokenizer: MatMul, attention, LayerNorm, GELU
TOLERANCE = 1e-5  # absolute, per embedding value (they are normalized: |v| <= 1)
INT8_TOLERANCE = 1e-4  # int8: integer kernels agree exactly; dequantization may round differently


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
            return True
    except OSError:
        return False


def _why_not() -> str | None:
    if platform.system() != "Linux":
        return "arm64 emulation needs Linux (binfmt_misc and qemu-user)"
    if platform.machine() == "aarch64":
        return "the host is arm64 itself: the rest of the suite tests the agent natively"
    if os.geteuid() != 0:
        return "needs root (binfmt_misc registration, chroot, mmdebstrap)"
    for tool, package in (("qemu-aarch64-static", "qemu-user-static"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {package}; 'make setup-test' does it as root)"
    if not any(CACHE.glob("root-*/opt/slmfleet/venv/bin/slmfleet")):
        if shutil.which("mmdebstrap") is None:
            return "no cached arm64 root and mmdebstrap not found to build one (apt-get install mmdebstrap)"
        for url in ("http://deb.debian.org/debian/dists/bookworm/Release", "https://pypi.org/simple/onnxruntime/"):
            if not _reachable(url):
                return f"no cached arm64 root, and {url} is not reachable to build one"
    return None


@pytest.fixture(scope="module")
def arm64_root() -> Iterator[Path]:
    """The cached root with this checkout's agent, locked for this module (another run waits, and cannot
    reinstall the agent under a running one)."""
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    binfmt = subprocess.run([str(SCRIPT), "binfmt"], capture_output=True, text=True, timeout=60, check=False)
    if binfmt.returncode != 0:  # e.g. a container without binfmt_misc
        pytest.skip(binfmt.stderr.strip() or "cannot register qemu-aarch64 with binfmt_misc")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = dict(os.environ, SLMFLEET_ARM64_LOCK_HELD="1", BUILD_PYTHON=sys.executable)
        built = subprocess.run(
            [str(SCRIPT), "build"], capture_output=True, text=True, timeout=3000, env=env, cwd=REPO, check=False
        )
        assert built.returncode == 0, f"building the arm64 root failed:\n{built.stderr[-6000:]}"
        yield Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture
def fleet(tmp_path: Path, private_broker: EmbeddedBroker) -> Iterator[Fleet]:
    f = Fleet(tmp_path, private_broker.url)
    yield f
    f.stop()


@pytest.fixture
def in_root(arm64_root: Path) -> Iterator[tuple[Path, str]]:
    """A directory of this test's own inside the root: (its host path, its path inside)."""
    inside = f"/tmp/arm64-test-{uuid.uuid4().hex[:8]}"
    host = arm64_root / inside.lstrip("/")
    host.mkdir(parents=True)
    yield host, inside
    shutil.rmtree(host, ignore_errors=True)


def elf_machine(path: Path) -> int:
    """The e_machine field of an ELF file (183 = EM_AARCH64, 62 = EM_X86_64)."""
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


def test_the_installer_put_an_arm64_agent_and_its_service_into_the_root(arm64_root: Path) -> None:
    """What deploy/install-agent.sh left in the root: a venv on the root's python whose native wheels are
    aarch64 builds, the configuration, and the unit enabled (systemctl in a chroot only enables)."""
    venv = arm64_root / "opt/slmfleet/venv"
    assert "/usr/bin" in (venv / "pyvenv.cfg").read_text()
    site = next((venv / "lib").glob("python3.*/site-packages"))
    for pattern in (
        "onnxruntime/capi/onnxruntime_pybind11_state*.so",
        "tokenizers/tokenizers*.so",
        "pydantic_core/_pydantic_core*.so",
        "numpy/*core/_multiarray_umath*.so",
        "cryptography/hazmat/bindings/_rust*.so",
    ):
        found = sorted(site.glob(pattern))
        assert found, f"{pattern} is not installed in {site}"
        assert elf_machine(found[0]) == 183, f"{found[0]} is not an aarch64 build"
    assert elf_machine(arm64_root / "usr/bin/python3.11") == 183
    config = (arm64_root / "etc/slmfleet/agent.toml").read_text()
    assert 'device_id = "arm64-device"' in config and 'data_dir = "/var/lib/slmfleet-agent"' in config
    assert (arm64_root / "etc/systemd/system/slmfleet-agent.service").is_file()
    assert (arm64_root / "etc/systemd/system/multi-user.target.wants/slmfleet-agent.service").is_symlink()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def deploy_and_wait(ctl: ControllerProc, name: str, variant: str, devices: list[str], timeout: float) -> dict[str, Any]:
    body = {"model": name, "version": 1, "variant": variant, "target": {"devices": devices}}
    auth = {"Authorization": f"Bearer {ctl.token}"}
    r = httpx.post(ctl.api + "/api/v1/deployments", json=body, headers=auth, timeout=10)
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    return wait_until(  # type: ignore[no-any-return]
        lambda: (d := ctl.get(f"/api/v1/deployments/{dep}").json())["status"] in ("completed", "failed") and d,
        timeout,
        what=f"{name} deployed to {devices}",
    )


def test_the_arm64_agent_installs_deploys_and_answers_like_the_x86_64_one(
    arm64_root: Path, in_root: tuple[Path, str], fleet: Fleet, tmp_path: Path
) -> None:
    host_dir, inside = in_root
    ctl = fleet.start_controller()
    key = ctl.get("/api/v1/signing-key").json()["public_key_pem"]
    (tmp_path / "controller.pem").write_text(key)
    (host_dir / "controller.pem").write_text(key)

    native_port, arm_port = free_port(), free_port()
    fleet.start_agent(DEVICE, "--signing-key-file", str(tmp_path / "controller.pem"), "--http-port", str(native_port))
    # The agent the installer put into the root, run by the root's arm64 python3.11 (binfmt -> qemu-aarch64).
    arm = Proc(
        [
            str(SCRIPT),
            "run",
            str(arm64_root),
            "/opt/slmfleet/venv/bin/slmfleet",
            "agent",
            *("--broker", fleet.broker_url, "--device-id", ARM64, "--data-dir", f"{inside}/data"),
            *("--signing-key-file", f"{inside}/controller.pem", "--http-port", str(arm_port)),
            *("--reconnect-max", "1"),
        ],
        tmp_path / f"{ARM64}.log",
    )
    fleet.agents[ARM64] = arm
    fleet.wait_online([DEVICE, ARM64], 300)  # imports under emulation take a while

    # It really is aarch64: the kernel runs it through qemu, and the agent's birth says aarch64.
    exe = os.readlink(f"/proc/{arm.pid}/exe")
    assert "qemu-aarch64" in exe, exe
    hardware = ctl.get(f"/api/v1/devices/{ARM64}").json()["hardware"]
    assert hardware["arch"] == "aarch64", hardware
    assert ctl.get(f"/api/v1/devices/{DEVICE}").json()["hardware"]["arch"] == "x86_64"

    # One deployment to both devices: the broadcast, verification, self-test and switch on each.
    import_export(ctl, "encoder", LAYOUT, {"variants": ["fp32", "int8"]})
    deploy_both(ctl, "fp32")
    assert "broadcast of" in ctl.proc.log()
    cases = reference(LAYOUT)
    native, arm64 = ask(native_port, cases, "fp32"), ask(arm_port, cases, "fp32")
    worst = max(max_diff(a, b) for a, b in zip(native, arm64, strict=True))
    print(f"fp32: max |x86-64 - arm64| = {worst:.2e}")
    assert worst <= TOLERANCE
    for case, got in zip(cases, arm64, strict=True):  # and the framework's own outputs
        assert max_diff(case["expected"]["embedding"], got) <= 1e-4, case["input"]
    # The comparison can fail: the texts' embeddings differ by far more than the tolerance.
    assert max_diff(arm64[0], arm64[1]) > 100 * TOLERANCE

    # The int8 variant of the same version: a switch while serving, and the integer kernels (x86-64's and
    # arm64's MLAS differ) giving the same embeddings within quantization's own noise.
    deploy_both(ctl, "int8")
    native8, arm8 = ask(native_port, cases, "int8"), ask(arm_port, cases, "int8")
    worst8 = max(max_diff(a, b) for a, b in zip(native8, arm8, strict=True))
    quantized = max(max_diff(a, b) for a, b in zip(arm64, arm8, strict=True))
    print(f"int8: max |x86-64 - arm64| = {worst8:.2e} (int8 against fp32: {quantized:.2e})")
    assert worst8 <= INT8_TOLERANCE and quantized > worst8  # and int8 is not fp32 again


def deploy_both(ctl: ControllerProc, variant: str) -> None:
    done = deploy_and_wait(ctl, "encoder", variant, [DEVICE, ARM64], 600)
    assert done["status"] == "completed" and {t["state"] for t in done["targets"]} == {"active"}, done


def ask(port: int, cases: list[dict[str, Any]], variant: str) -> list[list[float]]:
    """The embeddings an agent's HTTP endpoint gives for each reference case, served by ``variant``."""
    out = []
    for case in cases:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/infer", json=case["input"], timeout=120)
        assert r.status_code == 200, (port, r.text)
        model = r.json()["model"]
        assert (model["model"], model["version"], model["variant"]) == ("encoder", 1, variant), model
        out.append(r.json()["result"]["embedding"])
    return out
