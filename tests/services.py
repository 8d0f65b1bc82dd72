"""
Throwaway PostgreSQL and Redis servers for the storage and pub/sub tests.

Each server runs from the Debian packages' binaries on a free loopback port with a private data
directory, so the tests never touch a server the machine already runs, and it can be killed and
started again on the same port and data to test outages.  One of each is shared by the whole run
(L{shared_postgres}, L{shared_redis}); outage tests start their own.

When the binaries are missing the tests are skipped with the reason, unless
C{SYNCKIT_REQUIRE_SERVICES=true} (set by C{make test}, which installs them): then it is an error.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Optional

import psycopg2
from twisted.trial.unittest import SkipTest

STARTUP_TIMEOUT = 30.0


def unavailable(reason: str) -> Exception:
    """Skip the test, or fail it where the test command promised the servers."""
    if os.environ.get("SYNCKIT_REQUIRE_SERVICES") == "true":
        return RuntimeError(f"{reason} (SYNCKIT_REQUIRE_SERVICES=true: the servers should have been installed)")
    return SkipTest(f"*** {reason}: storage and pub/sub tests against real servers are SKIPPED ***")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready: Callable[[], bool], what: str, process: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {STARTUP_TIMEOUT} s:\n{_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-20:])
    except OSError:
        return "(no log)"


class _Server:
    """A child process on a fixed port and data directory that can be killed and restarted."""

    name = ""
    #: the account the server runs as (None: this process's own)
    user: Optional[str] = None

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"synckit-{self.name}-")
        self.log = os.path.join(self.dir, "server.log")
        self.process: Optional[subprocess.Popen] = None
        #: whether it ever started: a restart stays on its port
        self.started = False

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        """
        Start the server and wait until it answers.  C{ready} checks that the server answering
        is this one (its own directory): a port from L{free_port} is free only when asked, and
        two test runs at once can be handed the same one.  On a first start, a port taken
        meanwhile means another port; a restart keeps its port, as the outage tests need.
        """
        for attempt in range(3):
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=self.user
                )
            try:
                _wait(self.ready, f"{self.name} on port {self.port}", self.process, self.log)
                self.started = True
                return
            except RuntimeError:
                exited = self.process.poll() is not None
                if self.started or not exited or attempt == 2:
                    raise
                self.process = None
                self.port = free_port()

    def processes(self) -> list[int]:
        """
        The server's process and its children.  PostgreSQL's backends are each a session of
        their own, so a process-group signal would miss them.
        """
        assert self.process is not None
        parent = self.process.pid
        every = (int(path.split("/")[2]) for path in glob.glob("/proc/[0-9]*/stat"))
        return [parent] + [pid for pid in every if _parent(pid) == parent]

    def signal_all(self, signum: int) -> list[int]:
        """
        Signal every process of the server, and say which they were.  SIGSTOP stalls it without
        closing a socket.
        """
        pids = self.processes()
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # a backend that has just ended
        return pids

    def kill(self) -> None:
        """
        Kill -9 every process of the server at once, as a crash would, and wait until they are
        gone: a backend left running can still answer a query on a connection already open
        (and commit it).
        """
        if self.process is not None and self.process.poll() is None:
            pids = self.signal_all(signal.SIGKILL)
            self.process.wait()
            _wait_for_exit(pids)
        self.process = None

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_for_exit(pids: list[int]) -> None:
    """Wait until none of C{pids} runs (a zombie runs nothing), for up to five seconds."""
    for _ in range(1000):
        if not any(process_running(pid) for pid in pids):
            return
        time.sleep(0.005)


def process_running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _parent(pid: int) -> Optional[int]:
    fields = _stat(pid)
    return int(fields[1]) if fields is not None else None


def _stat(pid: int) -> Optional[list[str]]:
    """The fields of C{/proc/PID/stat} after the command name (state, parent, ...); C{None}: gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _binary(name: str, patterns: list[str]) -> Optional[str]:
    for pattern in patterns:
        found = sorted(glob.glob(pattern), reverse=True)
        if found:
            return found[0]
    return shutil.which(name)


class PostgresServer(_Server):
    name = "postgres"

    def __init__(self) -> None:
        bindir = _binary("initdb", ["/usr/lib/postgresql/*/bin/initdb"])
        if bindir is None:
            raise unavailable("PostgreSQL is not installed (apt-get install postgresql)")
        self.bindir = os.path.dirname(bindir)
        super().__init__()
        # PostgreSQL refuses to run as root: run it as the packages' postgres user, as a direct
        # child, so that a kill -9 leaves nothing behind holding its lock file.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        subprocess.run(
            [f"{self.bindir}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def command(self) -> list[str]:
        # fsync off: the tests kill processes, never the machine, so the OS keeps every commit.
        options = ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", f"unix_socket_directories={self.dir}"]
        return [f"{self.bindir}/postgres", "-D", self.data, "-p", str(self.port)] + options

    def ready(self) -> bool:
        try:
            conn = psycopg2.connect(self.url, connect_timeout=1)
        except psycopg2.OperationalError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW data_directory")
                return os.path.realpath(cur.fetchone()[0]) == os.path.realpath(self.data)
        finally:
            conn.close()

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run SQL synchronously, for test set-up and inspection."""
        conn = psycopg2.connect(self.url.rsplit("/", 1)[0] + "/" + database)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def new_database(self) -> str:
        """A fresh empty database on this server, and its URL."""
        name = f"t{next(_numbers)}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name


class RedisServer(_Server):
    name = "redis"

    def __init__(self) -> None:
        self.binary = _binary("redis-server", [])
        if self.binary is None:
            raise unavailable("Redis is not installed (apt-get install redis-server)")
        super().__init__()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"CONFIG GET dir\r\n")
                reply = s.recv(4096)
        except OSError:
            return False
        # *2 $3 dir $N <dir>: this server's own directory, not another run's server on this port
        parts = reply.split(b"\r\n")
        return len(parts) > 4 and parts[0] == b"*2" and parts[4] == os.path.realpath(self.dir).encode()


_numbers = iter(range(1, 1_000_000))
_shared: dict[str, _Server] = {}


def _shared_server(kind: type[_Server]) -> _Server:
    server = _shared.get(kind.name)
    if server is None or server.process is None:
        server = server or kind()
        server.start()
        _shared[kind.name] = server
    return server


def shared_postgres() -> PostgresServer:
    """The run's PostgreSQL server, started on first use."""
    return _shared_server(PostgresServer)  # type: ignore[return-value]


def shared_redis() -> RedisServer:
    """The run's Redis server, started on first use."""
    return _shared_server(RedisServer)  # type: ignore[return-value]


@atexit.register
def _stop_shared() -> None:
    for server in _shared.values():
        server.destroy()
