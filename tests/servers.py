"""A real PostgreSQL server and a real S3-compatible server (moto) on loopback, for the tests.

Each is started once per test session, in a private temporary directory, on a free port, and
stopped at the end. Nothing is mocked: DuckLake talks libpq to PostgreSQL 15 and HTTP to moto.

* PostgreSQL: the machine's binaries (``$NSD_PG_BIN``, else /usr/lib/postgresql/*/bin, else
  the PATH); ``initdb`` refuses to run as root, so as root the server runs as user
  ``postgres``. Trust authentication on 127.0.0.1 only.
* S3: ``moto_server`` from ``$NSD_MOTO_SERVER``, else .ci/moto-venv (``make test`` creates it),
  else the PATH.

A server that cannot start fails the test that needs it (no skip): see .ci/run.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 60.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {timeout:g} s\n{tail}")


# --------------------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path:
    if os.environ.get("NSD_PG_BIN"):
        return Path(os.environ["NSD_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL binaries not found: apt-get install -y postgresql (or set NSD_PG_BIN)")


class Postgres:
    """One PostgreSQL server; ``database()`` creates a fresh database and returns its store URI."""

    def __init__(self):
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="nsd-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> "Postgres":
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        user = self.user or os.environ.get("USER") or "postgres"
        self.user = user
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", user, "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200 -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                  str(self.dir / "log"), "-w", "start")
        _wait(self._ready, "PostgreSQL", log=self.dir / "log")
        return self

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def conninfo(self, dbname: str) -> str:
        return f"dbname={dbname} host=127.0.0.1 port={self.port} user={self.user}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        psql = self.bin / "psql" if (self.bin / "psql").exists() else "psql"
        out = subprocess.run([str(psql), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d",
                              self.conninfo(dbname), "-c", sql],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def database(self, prefix: str = "nsd") -> str:
        """A new empty database; returns the store URI ``postgres:<libpq string>``."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.psql(f"CREATE DATABASE {name}")
        return "postgres:" + self.conninfo(name)

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- S3 (moto)


def moto_server() -> str:
    for cand in (os.environ.get("NSD_MOTO_SERVER"), str(ROOT / ".ci" / "moto-venv" / "bin" / "moto_server"),
                 shutil.which("moto_server")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("moto_server not found: `make test` installs it in .ci/moto-venv (or set NSD_MOTO_SERVER)")


class S3:
    """One moto S3 server; ``bucket()`` creates a fresh bucket; ``env`` holds the AWS_* settings."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="nsd-s3-"))
        self.proc = None
        self.env = {
            "AWS_ACCESS_KEY_ID": "nsd-test-key",
            "AWS_SECRET_ACCESS_KEY": "nsd-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> "S3":
        log = open(self.dir / "log", "wb")
        self.proc = subprocess.Popen([moto_server(), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self._ready, "moto S3 server", log=self.dir / "log")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("moto_server exited:\n" + (self.dir / "log").read_text(errors="replace")[-2000:])
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
            return True
        except OSError:
            return False

    def bucket(self, prefix: str = "nsd") -> str:
        """A new bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10).read()
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
