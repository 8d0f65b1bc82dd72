"""
The real SyncKit SDK driven through the real service: each test starts synckit on port 0 in this
process and runs one node scenario from C{tests/e2e/} against it, which prints its checks as one
JSON line.

The SDK is a test client only and never part of the project: the current build is copied from
C{../shared/sdk} (its README says how to use it), and the 0.1.1 package that npm serves is
installed, into the git-ignored C{_e2e/} at the project root, with C{npm install} there, once per
run and only when missing or stale.  Without C{../shared/sdk} the tests are skipped, loudly;
without node 20+ or npm, or when npm cannot install, they are skipped too, unless
C{SYNCKIT_REQUIRE_SERVICES=true} (C{make test}): then they fail.
"""

from __future__ import annotations

import dataclasses
import filecmp
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from synckit import service as service_module
from synckit.pubsub.redis import RedisPubSub
from tests.services import shared_postgres, shared_redis
from tests.test_durability import storage
from tests.wsclient import ServiceCase

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "e2e"
#: the current SDK, built (read-only); SYNCKIT_SDK_DIR points elsewhere
SHARED_SDK = Path(os.environ.get("SYNCKIT_SDK_DIR") or ROOT.parent / "shared" / "sdk")
#: where the SDKs are installed for the tests (git-ignored)
CACHE = ROOT / "_e2e"
OLD_SDK = "0.1.1"
#: seconds a scenario may run before it reports what it has; the process is killed 15 s later
DEADLINE = 60
NPM_TIMEOUT = 300

_prefixes = itertools.count(1)


def unavailable(reason: str) -> Exception:
    """Skip, loudly; or fail where the test command promised node and npm (C{make test})."""
    if os.environ.get("SYNCKIT_REQUIRE_SERVICES") == "true":
        return RuntimeError(f"{reason} (SYNCKIT_REQUIRE_SERVICES=true and {SHARED_SDK} exists: the SDK tests must run)")
    return SkipTest(f"*** {reason}: the SDK end-to-end tests are SKIPPED ***")


class _Collect(ProcessProtocol):
    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else (reason.value.exitCode if reason.value.exitCode is not None else -1)
        self.done.callback((b"".join(self.out).decode(errors="replace"), b"".join(self.err).decode(errors="replace"), code))


async def run(argv: list[str], cwd: Path, timeout: float) -> tuple[str, str, int]:
    """Run a program without blocking the reactor; killed after C{timeout} seconds. (stdout, stderr, status)"""
    done: Deferred = Deferred()
    protocol = _Collect(done)
    process = reactor.spawnProcess(protocol, argv[0], argv, env=dict(os.environ), path=str(cwd))
    kill = reactor.callLater(timeout, process.signalProcess, "KILL")
    try:
        return await done
    finally:
        if kill.active():
            kill.cancel()


@dataclasses.dataclass(frozen=True)
class Node:
    """A node able to run the scenarios, and the SDKs installed for them."""

    argv: tuple[str, ...]
    sdk: Path
    #: SDK 0.1.1's package directory, or why npm could not install it
    old_sdk: Path | Exception


_prepared: Optional[Node] = None
_problem: Optional[Exception] = None


async def prepared() -> Node:
    """Node, and the SDKs installed in C{_e2e/}: done once per run (a failure is not retried)."""
    global _prepared, _problem
    if _prepared is None and _problem is None:
        if not (SHARED_SDK / "dist" / "index.mjs").is_file():
            raise SkipTest(f"*** {SHARED_SDK} (the SyncKit SDK build) is missing: the SDK end-to-end tests are SKIPPED ***")
        try:
            _prepared = await _prepare()
        except (SkipTest, RuntimeError) as e:
            _problem = e
    if _problem is not None:
        raise _problem
    assert _prepared is not None
    return _prepared


async def _prepare() -> Node:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise unavailable("node and npm are needed (node 20 or later)")
    out, _, _ = await run([node, "--version"], ROOT, 30)
    major = int(out.strip().lstrip("v").split(".")[0] or 0)
    if major < 20:
        raise unavailable(f"node {out.strip()} is too old: the SDK needs a WebSocket global (node 20 or later)")
    # node 20 and 21 have the WebSocket global the SDK uses behind a flag; 22 has it by default.
    argv = (node, "--experimental-websocket") if major < 22 else (node,)

    sdk = CACHE / "sdk"
    if not _same_build(SHARED_SDK, sdk):
        copy = CACHE / f"sdk.{os.getpid()}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(SHARED_SDK, copy)
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)  # shared/ is read-only, the copy must not be
        shutil.rmtree(sdk, ignore_errors=True)
        copy.rename(sdk)
    await _npm_install(npm, sdk, sdk / "node_modules" / "lz-string")

    old = CACHE / f"sdk-{OLD_SDK}"
    old.mkdir(parents=True, exist_ok=True)
    # 0.1.1's index imports its React adapter, so react (an optional peer) must be there too.
    manifest = {"private": True, "dependencies": {"@synckit-js/sdk": OLD_SDK, "react": "^18.0.0"}}
    (old / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    package = old / "node_modules" / "@synckit-js" / "sdk"
    try:
        await _npm_install(npm, old, package / "dist" / "index.mjs")
    except (SkipTest, RuntimeError) as e:
        return Node(argv, sdk, e)
    return Node(argv, sdk, package)


def _same_build(source: Path, copy: Path) -> bool:
    files = ["package.json", "dist/index.mjs", "wasm/default/synckit_core_bg.wasm"]
    return all((copy / f).is_file() and filecmp.cmp(source / f, copy / f, shallow=False) for f in files if (source / f).exists())


async def _npm_install(npm: str, directory: Path, installed: Path) -> None:
    if installed.exists():
        return
    out, err, code = await run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], directory, NPM_TIMEOUT)
    if code != 0 or not installed.exists():
        raise unavailable(f"npm install in {directory} failed (status {code}): {(err or out).strip()[-500:]}")


class SDKCase(ServiceCase):
    """Runs node scenarios against services started here."""

    async def scenario(self, name: str, urls: list[str], **args: Any) -> dict[str, Any]:
        """Run C{tests/e2e/NAME.mjs} against C{urls} (and C{args}); its result, once every check in it passed."""
        node = await prepared()
        args = {"sdk": str(node.sdk), "urls": urls, "deadlineMs": DEADLINE * 1000, **args}
        argv = [*node.argv, str(SCENARIOS / f"{name}.mjs"), json.dumps(args)]
        out, err, code = await run(argv, ROOT, DEADLINE + 15)
        lines = out.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError):
            self.fail(f"{name}.mjs printed no result (status {code}):\n{out[-2000:]}\n--- stderr ---\n{err[-3000:]}")
        failed = [c for c in result["checks"] if not c["ok"]]
        if failed or not result["ok"]:
            report = "\n".join(f"  FAILED {c['name']}: {json.dumps(c.get('detail'))[:600]}" for c in failed)
            passed = ", ".join(c["name"] for c in result["checks"] if c["ok"])
            self.fail(f"{name}.mjs:\n{report}\n  passed: {passed}\n--- stderr (end) ---\n{err[-1500:]}")
        return result

    async def url(self, **overrides: Any) -> str:
        """The /ws URL of a service started with C{overrides} (memory storage, auth off)."""
        _, port = await self.started(**overrides)
        return f"ws://127.0.0.1:{port}/ws"

    async def instances(self, count: int = 2) -> list[str]:
        """The URLs of services sharing one PostgreSQL database and one Redis (a channel prefix of their own)."""
        database = shared_postgres().new_database()
        prefix = f"sdk-e2e-{next(_prefixes)}:"
        urls = []
        for _ in range(count):
            pubsub = RedisPubSub(reactor, shared_redis().url, prefix=prefix, timeout=1)
            urls.append(await self.url(storage=storage(database), pubsub=pubsub))
        return urls


class CurrentSDKTests(SDKCase):
    """The current SDK (upstream sdk/ 0.3.0, built) against one synckit."""

    async def test_fields_converge(self) -> None:
        """Three clients write their own fields and the same shared ones at once: all end with one state."""
        await self.scenario("fields", [await self.url()])

    async def test_late_joiner(self) -> None:
        """Two clients write fields; a client joining afterwards sees them all."""
        await self.scenario("late_joiner", [await self.url()])

    async def test_text_concurrent_edits_and_late_joiner(self) -> None:
        """
        One client prepends "X" and another appends "Y" to "Hello World" at once: both show
        "XHello WorldY", and so does a client joining later (the server merges, never replaces).
        """
        await self.scenario("text", [await self.url()])

    async def test_text_after_restart_on_postgres(self) -> None:
        """The merged text of concurrent edits is what a client sees after the server restarts on PostgreSQL."""
        database = shared_postgres().new_database()
        service, port = await self.started(storage=storage(database))
        url = f"ws://127.0.0.1:{port}/ws"
        await self.scenario("text", [url], doc="restarted-text")
        await service.stopService()
        await self.scenario("text", [await self.url(storage=storage(database))], doc="restarted-text", expect="XHello WorldY")

    async def test_counter(self) -> None:
        """Two clients increment and decrement one counter at once; each client, and a third, sees the sum."""
        await self.scenario("counter", [await self.url()])

    async def test_set(self) -> None:
        """Two clients add to and remove from one set; each client, and a third, sees the same members."""
        await self.scenario("set", [await self.url()])

    async def test_presence_across_reconnect(self) -> None:
        """
        Presence is seen both ways, does not expire while its connection is open however quiet
        (the timeout is 1 s here, swept every 0.25 s), is withdrawn (state null) when that
        connection drops, and flows both ways again once the reconnected client publishes,
        although the SDK does not send awareness_subscribe after reconnecting.
        """
        self.patch(service_module, "HOUSEKEEPING_INTERVAL", 0.25)
        await self.scenario("presence", [await self.url(awareness_timeout=1000)], quietMs=2500)


class ScaleOutSDKTests(SDKCase):
    """The current SDK on two synckit instances sharing PostgreSQL and Redis."""

    async def test_fields_converge_across_instances(self) -> None:
        """Three clients spread over two instances write fields at once: all end with one state."""
        await self.scenario("fields", await self.instances())

    async def test_text_across_instances(self) -> None:
        """Concurrent text edits on two instances converge, and a later client on either sees the merge."""
        await self.scenario("text", await self.instances())


class OldSDKTests(SDKCase):
    """SDK 0.1.1, what npm serves: it ignores sync_response's state and applies only per-field deltas."""

    async def test_old_sdk_late_joiner(self) -> None:
        """A 0.1.1 client joining a document the current SDK wrote sees every field."""
        node = await prepared()
        if isinstance(node.old_sdk, Exception):
            raise node.old_sdk
        await self.scenario("late_joiner", [await self.url()], lateSdk=str(node.old_sdk))
