"""PostgreSQL and Redis on 127.0.0.1, for a production-like Dagster instance on one machine.

    python -m pipelines.services start DIR     # initdb + pg_ctl, redis-server; pids in DIR
    python -m pipelines.services stop DIR

Debian's `postgresql` and `redis-server` packages provide the binaries (`make services`
installs them). PostgreSQL refuses to run as root, so as root it runs as the `postgres`
user. Both listen on 127.0.0.1 only, on free ports written to DIR/services.json, which also
holds the `dagster.yaml` storage block and the Celery broker URL that use them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"{name}: PostgreSQL is not installed (make services installs it)")
    return found[-1]


def available() -> str:
    """'' when both services can be started here, else why not."""
    try:
        postgres_bin("pg_ctl")
    except FileNotFoundError as e:
        return str(e)
    if not shutil.which("redis-server"):
        return "redis-server is not installed (make services installs it)"
    return ""


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start(root: str | Path) -> dict:
    """Start both; returns (and writes to root/services.json) their ports, pids and URLs."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # The postgres user must reach its data directory: root's temporary folders (a
        # pytest tmp_path, say) are closed to it, so the data lives in a folder of its own.
        pg = Path(tempfile.mkdtemp(prefix="alignfoundry-postgres-"))
        shutil.chown(pg, "postgres", "postgres")
    else:
        pg = root / "postgres"
        pg.mkdir(exist_ok=True)
    pg_port, redis_port = free_port(), free_port()
    if not (pg / "PG_VERSION").exists():
        subprocess.run(
            _as_postgres([postgres_bin("initdb"), "-D", str(pg), "-A", "trust", "-U", "dagster"]),
            check=True,
            capture_output=True,
        )
    options = f"-p {pg_port} -c listen_addresses=127.0.0.1 -k {pg}"
    subprocess.run(
        _as_postgres(
            [
                postgres_bin("pg_ctl"),
                "-D",
                str(pg),
                "-o",
                options,
                "-l",
                str(pg / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", redis_port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    pg_pid = int((pg / "postmaster.pid").read_text().splitlines()[0])
    info = {
        "postgres_dir": str(pg),
        "postgres_port": pg_port,
        "postgres_pid": pg_pid,
        "redis_port": redis_port,
        "redis_pid": redis.pid,
        "broker": f"redis://127.0.0.1:{redis_port}/0",
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": "dagster",
                    "password": "",
                    "hostname": "127.0.0.1",
                    "db_name": "postgres",
                    "port": pg_port,
                    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, with which
                    # dagster-postgres's NOTIFY fails: name psycopg2.
                    "scheme": "postgresql+psycopg2",
                }
            }
        },
    }
    (root / "services.json").write_text(json.dumps(info, indent=2))
    return info


def stop(root: str | Path) -> None:
    """Stop what `start` started (by the pids it recorded)."""
    root = Path(root).resolve()
    info_file = root / "services.json"
    if not info_file.exists():
        return
    info = json.loads(info_file.read_text())
    subprocess.run(
        _as_postgres([postgres_bin("pg_ctl"), "-D", info["postgres_dir"], "-m", "fast", "stop"]),
        capture_output=True,
    )
    if Path(info["postgres_dir"]).parent != root:
        shutil.rmtree(info["postgres_dir"], ignore_errors=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(info["redis_pid"], signal.SIGTERM)
    info_file.unlink()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print("usage: python -m pipelines.services start|stop DIR", file=sys.stderr)
        return 2
    if args[0] == "start":
        print(json.dumps(start(args[1]), indent=2))
    else:
        stop(args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
