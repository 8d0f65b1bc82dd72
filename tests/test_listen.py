"""
Where the server listens (``--listen``, ``--metrics-listen``): real clients through a TLS
endpoint with a certificate made here, through a unix socket, and through a socket passed the
way systemd passes one; endpoint strings checked before anything listens; the listeners as
children of the service tree, started only once the backends are up.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import time
from typing import Any, Optional

from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from synckit.config import Config
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.service import SyncKitService
from synckit.storage.memory import MemoryStorage
from synckit.tap import Options, makeService
from synckit.web import make_listener
from tests.helpers import Harness, config
from tests.test_tap import TWISTD
from tests.wsclient import RecordingClient

ROOT = os.path.join(os.path.dirname(__file__), "..")
#: what both clients may do in the sync tests
PERMISSIONS = {"canRead": ["doc-1"], "canWrite": ["doc-1"], "isAdmin": False}


def certificate(folder: str) -> tuple[str, str, bytes]:
    """A self-signed certificate for localhost and 127.0.0.1: (key file, certificate file, PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_file, cert_file = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(cert_file, "wb") as f:
        f.write(pem)
    return key_file, cert_file, pem


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """Agent's TLS policy: trust the test certificate, and nothing else."""

    def __init__(self, pem: bytes) -> None:
        self._root = Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


@implementer(IAgentEndpointFactory)
class UnixSocket:
    """Agent's endpoints: every URL is the unix socket at C{path}."""

    def __init__(self, path: str) -> None:
        self._path = path

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(reactor, self._path)


class ListenCase(TestCase):
    def start(self, **overrides: Any) -> SyncKitService:
        service = SyncKitService(config(**overrides), reactor, MemoryStorage(), LocalPubSub(LocalBus(reactor)))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    async def client(self, endpoint: IStreamClientEndpoint, url: str) -> RecordingClient:
        factory = WebSocketClientFactory(url)
        factory.protocol = RecordingClient
        client = await endpoint.connect(factory)
        self.addCleanup(lambda: client.state != client.STATE_CLOSED and client.dropConnection(abort=True))
        await client.opened
        return client

    async def sync(self, service: SyncKitService, alice: RecordingClient, bob: RecordingClient) -> None:
        """Both authenticate and subscribe; Alice's write is acknowledged, then broadcast to both."""
        for c, user in ((alice, "alice"), (bob, "bob")):
            token = service.server.tokens.access_token(user, f"{user}@example.com", PERMISSIONS)
            c.send("auth", {"id": f"auth-{user}", "token": token})
            self.assertEqual((await c.wait_type("auth_success"))["userId"], user)
            c.send("sync_request", {"id": user, "documentId": "doc-1"})
            self.assertEqual((await c.wait_type("sync_response"))["requestId"], user)
        alice.send("delta", {"id": "w1", "documentId": "doc-1", "delta": {"title": "héllo"}, "vectorClock": {}})
        self.assertEqual((await alice.wait_type("ack"))["messageId"], "w1")
        for c in (alice, bob):
            delta = await c.wait_type("delta")
            self.assertEqual((delta["field"], delta["value"]), ("title", "héllo"))

    async def get(self, agent: Agent, url: str) -> tuple[int, Any]:
        response = await agent.request(b"GET", url.encode("ascii"))
        return response.code, json.loads(await readBody(response))


class TLSTests(ListenCase):
    def test_wss_upgrade_auth_and_sync(self) -> Deferred:
        """
        Through an ``ssl:`` endpoint: wss:// clients that trust only the test certificate and
        offer ALPN as browsers do (h2, http/1.1) get http/1.1, are upgraded straight to WebSocket
        by the router, authenticate with a token, and a write is acknowledged and broadcast;
        HTTPS serves /health/live on the same port.
        """

        async def run() -> None:
            folder = self.mktemp()
            os.makedirs(folder)
            key, cert, pem = certificate(folder)
            service = self.start(auth_required=True, listen=(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",))
            await service.started
            port = service.ports[0].getHost().port
            tls = optionsForClientTLS(
                "localhost", trustRoot=Certificate.loadPEM(pem), acceptableProtocols=[b"h2", b"http/1.1"]
            )
            clients = [
                await self.client(wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port)), f"wss://localhost:{port}/ws")
                for _ in range(2)
            ]
            self.assertEqual(len(service.server.sessions), 2)
            await self.sync(service, *clients)
            agent = Agent(reactor, contextFactory=TrustOnly(pem))
            self.assertEqual(await self.get(agent, f"https://localhost:{port}/health/live"), (200, {"status": "alive"}))

        return ensureDeferred(run())


class UnixSocketTests(ListenCase):
    def test_websocket_and_http_over_a_unix_socket(self) -> Deferred:
        """
        Through a ``unix:`` endpoint, as behind nginx or HAProxy: WebSocket clients authenticate
        and sync, and HTTP answers, though a unix socket's peer has no address.
        """

        async def run() -> None:
            folder = self.mktemp()
            os.makedirs(folder)
            path = os.path.join(folder, "synckit.sock")
            service = self.start(auth_required=True, listen=(f"unix:{path}",))
            await service.started
            self.assertEqual(service.ports[0].getHost(), UNIXAddress(path))
            clients = [await self.client(UNIXClientEndpoint(reactor, path), "ws://localhost/ws") for _ in range(2)]
            await self.sync(service, *clients)
            agent = Agent.usingEndpointFactory(reactor, UnixSocket(path))
            self.assertEqual(await self.get(agent, "http://localhost/health/live"), (200, {"status": "alive"}))
            code, health = await self.get(agent, "http://localhost/health")
            self.assertEqual((code, health["connections"]["totalConnections"]), (200, 2))

        return ensureDeferred(run())

    def test_unix_connections_are_not_capped_per_address(self) -> None:
        """
        Plain HTTP connections on a unix socket all have the same (no) peer address; they are
        not held to the per-address cap, which would otherwise cap everyone behind the proxy.
        """
        harness = Harness(max_http_connections_per_ip=2)
        listener = make_listener(harness.server, harness.server.config)
        self.assertTrue(all(listener.buildProtocol(UNIXAddress(None)) is not None for _ in range(5)))


class SeveralEndpointsTests(ListenCase):
    def test_every_endpoint_serves_the_same_server(self) -> Deferred:
        """Two --listen endpoints, TCP and a unix socket, share one server: a write on one is seen on the other."""

        async def run() -> None:
            folder = self.mktemp()
            os.makedirs(folder)
            path = os.path.join(folder, "s.sock")
            service = self.start(auth_required=True, listen=("tcp:0:interface=127.0.0.1", f"unix:{path}"))
            await service.started
            port = service.ports[0].getHost().port
            alice = await self.client(TCP4ClientEndpoint(reactor, "127.0.0.1", port), f"ws://127.0.0.1:{port}/ws")
            bob = await self.client(UNIXClientEndpoint(reactor, path), "ws://localhost/ws")
            await self.sync(service, alice, bob)

        return ensureDeferred(run())

    def test_metrics_listen_endpoint(self) -> Deferred:
        """--metrics-listen takes an endpoint: /metrics is served there (with /health/live), and not on the main port."""

        async def run() -> None:
            service = self.start(listen=("tcp:0:interface=127.0.0.1",), metrics_listen=("tcp:0:interface=127.0.0.1",))
            await service.started
            main, metrics = (p.getHost().port for p in service.ports)
            agent = Agent(reactor)
            response = await agent.request(b"GET", f"http://127.0.0.1:{main}/metrics".encode())
            await readBody(response)
            self.assertEqual(response.code, 404)
            response = await agent.request(b"GET", f"http://127.0.0.1:{metrics}/metrics".encode())
            self.assertIn(b"synckit_connections", await readBody(response))
            self.assertEqual(await self.get(agent, f"http://127.0.0.1:{metrics}/health/live"), (200, {"status": "alive"}))

        return ensureDeferred(run())

    def test_cannot_listen_stops_the_start(self) -> Deferred:
        """An endpoint that cannot listen (its port taken) fails the start, which twistd turns into exit 1."""

        async def run() -> None:
            taken = socket.socket()
            self.addCleanup(taken.close)
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            service = self.start(listen=("tcp:0:interface=127.0.0.1", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"))
            with self.assertRaises(CannotListenError):
                await service.started
            await service.stopService()
            self.assertEqual(service.ports, [])

        return ensureDeferred(run())


class Backends(MemoryStorage):
    """Memory storage whose start the test finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.starting: Deferred = Deferred()

    def start(self) -> Deferred:
        return self.starting


class NoIPv6(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if interface == "::1":
            raise CannotListenError(interface, port, OSError("Cannot assign requested address"))
        return super().listenTCP(port, factory, backlog, interface)


class ServiceTreeTests(SynchronousTestCase):
    def test_listeners_start_after_the_backends(self) -> None:
        """
        Each endpoint is a StreamServerEndpointService child of the root service; none listens,
        even when twistd calls privilegedStartService, until storage and pub/sub are up.
        """
        clock = MemoryReactorClock()
        storage = Backends()
        service = SyncKitService(
            config(listen=("tcp:8081:interface=127.0.0.1", "unix:/run/synckit/s.sock"), metrics_port=9100),
            clock,
            storage,
            LocalPubSub(LocalBus(clock)),
        )
        self.assertEqual([isinstance(child, StreamServerEndpointService) for child in service], [True] * 3)
        service.privilegedStartService()
        service.startService()
        clock.run()
        self.assertEqual((clock.tcpServers, clock.unixServers), ([], []))
        storage.starting.callback(None)
        self.assertEqual([(port, interface) for port, _, _, interface in clock.tcpServers], [(8081, "127.0.0.1"), (9100, "127.0.0.1")])
        self.assertEqual([path for path, *_ in clock.unixServers], ["/run/synckit/s.sock"])
        self.assertEqual(len(service.ports), 3)
        self.successResultOf(service.started)

    def test_no_ipv6_loopback_is_only_a_warning(self) -> None:
        """HOST=localhost on a machine without ::1 listens on 127.0.0.1 and says so."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = NoIPv6()
        service = SyncKitService(config(port=8090, host="localhost"), clock, MemoryStorage(), LocalPubSub(LocalBus(clock)))
        service.startService()
        clock.run()
        self.successResultOf(service.started)
        self.assertEqual([interface for _, _, _, interface in clock.tcpServers], ["127.0.0.1"])
        self.assertEqual([e["endpoint"] for e in events if e.get("log_format", "").startswith("not listening")], [r"tcp:8090:interface=\:\:1"])


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str, env: Optional[dict[str, str]] = None) -> Config:
        self.patch(os, "environ", env or {})
        options = Options()
        options.parseOptions(list(args))
        return options.config

    def test_listen_repeats_and_splits(self) -> None:
        """--listen may be repeated; SYNCKIT_LISTEN separates endpoints with commas or spaces."""
        self.assertEqual(
            self.parse("--listen", "tcp:8080", "--listen", "unix:/run/synckit/synckit.sock").listen,
            ("tcp:8080", "unix:/run/synckit/synckit.sock"),
        )
        self.assertEqual(self.parse(env={"SYNCKIT_LISTEN": r"tcp:8080, tcp:8081:interface=\:\:1 tcp:8082"}).listen,
                         ("tcp:8080", r"tcp:8081:interface=\:\:1", "tcp:8082"))  # fmt: skip

    def test_bad_endpoints_are_usage_errors(self) -> None:
        """Every bad endpoint string is refused while parsing options, naming the setting."""
        for args, named in (
            (["--listen", "tcp:eighty"], "--listen (SYNCKIT_LISTEN)"),
            (["--listen", "nosuchtype:1"], "--listen (SYNCKIT_LISTEN)"),
            (["--listen", "ssl:8443:privateKey=/nonexistent/key.pem"], "--listen (SYNCKIT_LISTEN)"),
            (["--listen", "systemd:domain=INET:index=7"], "systemd passed no such socket"),
            (["--metrics-listen", "tcp:0:nosuchoption=1"], "--metrics-listen (SYNCKIT_METRICS_LISTEN)"),
            (["--metrics-listen", "tcp:9100", "--metrics-port", "9100"], "set one"),
        ):
            with self.assertRaises(UsageError, msg=args) as caught:
                self.parse(*args)
            self.assertIn(named, str(caught.exception))

    def test_makeservice_listens_on_the_endpoints(self) -> None:
        """makeService turns --listen into listeners on those endpoints, and nothing on port/host."""
        options = Options()
        self.patch(os, "environ", {})
        options.parseOptions(["--port", "9999", "--listen", "tcp:8443:interface=127.0.0.1", "--listen", "unix:/tmp/x.sock"])
        clock = MemoryReactorClock()
        service = makeService(options, clock)
        service.startService()
        clock.run()
        self.assertEqual([(port, interface) for port, _, _, interface in clock.tcpServers], [(8443, "127.0.0.1")])
        self.assertEqual([path for path, *_ in clock.unixServers], ["/tmp/x.sock"])


def _read_until(process: subprocess.Popen, marker: bytes, seconds: float) -> bytes:
    output = b""
    deadline = time.monotonic() + seconds
    while marker not in output and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        output += chunk
    return output


class SocketActivationTests(SynchronousTestCase):
    def test_listens_on_the_socket_systemd_passes(self) -> None:
        """
        ``twistd -n synckit --listen systemd:domain=INET:index=0`` with a listening socket passed
        as systemd passes one (fd 3, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID naming the daemon's
        own pid): a request sent before the daemon has even started waits in the socket's
        backlog and is answered, with no refused connection, and SIGTERM still exits 0.
        """
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        fd = listening.fileno()
        # The shell's pid is the daemon's, as it execs it; it puts the socket on fd 3.
        shell = f'LISTEN_PID=$$; export LISTEN_PID; exec "$@" 3<&{fd}'
        process = subprocess.Popen(
            ["/bin/sh", "-c", shell, "sh", *TWISTD, "-n", "--pidfile=", "synckit", "--listen", "systemd:domain=INET:index=0"],
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "synckit.socket", "SYNCKIT_AUTH_REQUIRED": "false"},
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())

        early = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.addCleanup(early.close)
        early.request("GET", "/health/live")
        response = early.getresponse()
        self.assertEqual((response.status, json.loads(response.read())), (200, {"status": "alive"}))

        output = _read_until(process, b"synckit listening", 30)
        self.assertIn(f"synckit listening on 127.0.0.1 port {port} (systemd:domain=INET:index=0)".encode(), output)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0, (output + rest).decode())

    def test_bad_listen_fails_before_listening(self) -> None:
        """A bad --listen stops twistd with exit 1 and a message naming the option, before anything listens."""
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "synckit", "--listen", "tcp:8080:interface=127.0.0.1", "--listen", "tcp:eighty"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn("--listen (SYNCKIT_LISTEN): cannot listen on 'tcp:eighty'", output)
        self.assertNotIn("synckit listening", output)
