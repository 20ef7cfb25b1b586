"""A throwaway PostgreSQL cluster from the Debian server binaries: initdb into a directory, trust auth."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kinshasa.infra.process import InfraError, ManagedProcess, port_open, wait_until

DATABASE = "kinshasa"
USER = "kinshasa"


def postgres_bindir() -> Path:
    """Where initdb and postgres live: pg_config's answer, else the newest Debian server package."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if (bindir / "postgres").exists() and (bindir / "initdb").exists():
            return bindir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for candidate in reversed(candidates):
        if (Path(candidate) / "postgres").exists():
            return Path(candidate)
    raise InfraError("PostgreSQL server binaries (initdb, postgres) were not found; install them "
                     "(Debian: apt-get install postgresql) or give a database URL instead.")


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root; when we are root, run it as an unprivileged account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise InfraError("running as root and no 'postgres' or 'nobody' account exists to run "
                     "PostgreSQL as; create one or run as an ordinary user.")


@dataclass
class PostgresCluster:
    """One cluster with data, socket and log under `root`, listening on 127.0.0.1:`port`."""

    root: Path
    port: int = 5433

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def process(self) -> ManagedProcess:
        bindir = postgres_bindir()
        return ManagedProcess(
            name="postgres",
            argv=[str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                  "-h", "127.0.0.1", "-k", str(self.root),
                  # A test and dev cluster: durability across power loss is not its job.
                  "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                  "-c", "max_connections=300"],
            log_path=self.root / "postgres.log",
            pid_path=self.root / "postgres.pid",
            # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client.
            stop_signal=signal.SIGINT,
            user=_server_user(),
        )

    def _chown(self, path: Path) -> None:
        user = _server_user()
        if user is None:
            return
        entry = pwd.getpwnam(user)
        for dirpath, _dirs, files in os.walk(path):
            os.chown(dirpath, entry.pw_uid, entry.pw_gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._chown(self.root)
        result = subprocess.run(
            [str(postgres_bindir() / "initdb"), "-D", str(self.data), "-U", USER,
             "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            capture_output=True, text=True, check=False, user=_server_user(),
        )
        if result.returncode != 0:
            raise InfraError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def _create_database(self) -> None:
        psql = postgres_bindir() / "psql"
        exe = str(psql) if psql.exists() else "psql"
        base = [exe, "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres",
                "-tAc"]
        exists = subprocess.run([*base, f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'"],
                                capture_output=True, text=True, check=False)
        if exists.stdout.strip() != "1":
            created = subprocess.run([*base, f"CREATE DATABASE {DATABASE}"],
                                     capture_output=True, text=True, check=False)
            if created.returncode != 0:
                raise InfraError(f"could not create database {DATABASE}: {created.stderr}")

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        isready = postgres_bindir() / "pg_isready"
        result = subprocess.run([str(isready), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                                check=False)
        return result.returncode == 0

    def start(self, attached: bool, timeout: float = 60.0) -> float:
        self._initdb()
        self._chown(self.root)
        process = self.process
        process.start(attached=attached)
        self._running = process
        took = wait_until(self.ready, process, timeout, f"PostgreSQL on 127.0.0.1:{self.port}")
        self._create_database()
        return took

    def stop(self) -> None:
        getattr(self, "_running", self.process).stop()
