"""A PostgreSQL server of a test's own (never the machine's running one): ``initdb`` into a fresh directory and
``pg_ctl`` on a free port on 127.0.0.1, so a test can stop it (``kill``: SIGKILL of the postmaster, or
``stop("immediate")``) and start it again on the same data and port. Runs as the ``postgres`` OS user (initdb
refuses root); the test is skipped, with the reason, when the binaries or that user are missing."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from controller.broker.embedded import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One server: ``url`` (user postgres, trust authentication, database postgres), ``start``, ``stop``,
    ``kill`` (SIGKILL of the postmaster: the database just goes away), ``pid``."""

    def __init__(self, bin_dir: Path, root: Path, user: str = "postgres") -> None:
        self.bin = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.user = user
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = ["runuser", "-u", self.user, "--", *args] if os.geteuid() == 0 else list(args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}"

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c max_connections=200"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (as a crash or a pulled plug): clients' connections break at
        once, new ones are refused until ``start``."""
        pid = self.pid
        assert pid is not None, "the server is not running"
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
        os.kill(pid, signal.SIGKILL)
        for child in children.split():
            with suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started server of this test's own, stopped and deleted afterwards; skips when it cannot be had."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin)")
    user = "postgres"
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(user)
        except KeyError:
            pytest.skip("no 'postgres' OS user to run initdb as (it refuses root)")
        if shutil.which("runuser") is None:
            pytest.skip("no runuser to run initdb as the postgres user")
    root = Path(tempfile.mkdtemp(prefix="slmfleet-pg-"))
    if os.geteuid() == 0:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bin_dir, root, user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            try:
                server.stop("immediate")
            except AssertionError:
                server.kill()
        shutil.rmtree(root, ignore_errors=True)
