"""
The HTTP side of every listening port (docs/protocol.md): ``/ws`` for
WebSockets, ``/``, ``/health``, ``/health/live`` and ``/health/ready``, the ``/auth`` routes, ``/rooms``, and, only when switched on,
``POST /_test/clear`` and the demo's ``/auth/login`` and ``/auth/refresh``.  Every response carries the
reference's CORS and security headers.

The port is guarded before any of that (docs/security.md): connections per peer address not
upgraded to WebSocket are capped, a request's headers must arrive within a deadline, and a body
larger than the cap is refused from its ``Content-Length`` before a byte of it is read.
"""

from __future__ import annotations

import datetime
import hmac
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import orjson
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synckit import __version__
from synckit.auth import InvalidToken
from synckit.config import Config, IPNetwork, metrics_endpoints
from synckit.limits import UNIX_PEER, forwarded_client, is_trusted
from synckit.metrics import Metrics
from synckit.server import SyncServer
from synckit.upgrade import Routed, UpgradeRouter
from synckit.websocket import SyncFactory, echo_factory

#: the header that unlocks /health's per-document details: one of the configured api-keys
API_KEY_HEADER = b"X-API-Key"

#: what a route handler answers: (status, JSON body), now or later
Answer = Union[tuple[int, Any], "Deferred[tuple[int, Any]]"]

SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
        b"style-src 'self' 'unsafe-inline'; img-src 'self' data: https:; connect-src 'self' wss: ws:; "
        b"font-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; upgrade-insecure-requests"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"X-XSS-Protection": b"1; mode=block",
    b"Referrer-Policy": b"strict-origin-when-cross-origin",
}


class SyncKitRequest(Request):
    """Adds CORS to every response and answers preflights, then the reference's security headers."""

    def process(self) -> None:
        origin: bytes = self.channel.site.cors_origin
        self.setHeader(b"Access-Control-Allow-Credentials", b"true")
        if origin == b"*":
            self.setHeader(b"Access-Control-Allow-Origin", b"*")
        else:
            self.setHeader(b"Vary", b"Origin")
            if self.getHeader(b"Origin") == origin:
                self.setHeader(b"Access-Control-Allow-Origin", origin)
        if self.method == b"OPTIONS":
            self.setResponseCode(204)
            self.setHeader(b"Access-Control-Allow-Methods", b"GET,HEAD,PUT,POST,DELETE,PATCH")
            requested = self.getHeader(b"Access-Control-Request-Headers")
            if requested:
                self.setHeader(b"Access-Control-Allow-Headers", requested)
            self.finish()
            return
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        super().process()

    def client_address(self) -> str:
        """The client's address: the peer's, or what a trusted proxy forwarded."""
        address = self.getClientAddress()
        peer = UNIX_PEER if isinstance(address, UNIXAddress) else getattr(address, "host", "unknown")
        forwarded = self.requestHeaders.getRawHeaders(b"X-Forwarded-For")
        return forwarded_client(
            peer,
            b",".join(forwarded).decode("latin-1") if forwarded else None,
            (self.getHeader(b"X-Real-IP") or b"").decode("latin-1"),
            self.channel.site.trusted_proxies,
        )


class LimitedChannel(HTTPChannel):
    """
    An HTTP connection with a deadline for each request's headers and a cap on its body.

    Twisted's idle timeout starts again on every byte, so a client that trickles one header byte
    every few seconds would hold its connection, and a file descriptor, for ever.  The header
    clock runs from the connection's start, and again from the end of each response on a kept-
    alive connection, until the blank line that ends the headers.  A body is refused from its
    declared length, before it is read; a body without one (chunked) is refused too, as its
    size would only be known by reading it, and no route takes one.  The hooks this takes
    (C{allHeadersReceived}, C{length}, C{requests}, C{persistent}, C{requestDone}) are not
    Twisted's interface: tests/test_dependencies.py checks them.
    """

    _log = Logger()
    site: "SyncKitSite"
    _header_clock: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_header_clock()

    def _start_header_clock(self) -> None:
        self._header_clock = self.callLater(self.site.header_timeout, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_clock is not None and self._header_clock.active():
            self._header_clock.cancel()
        self._header_clock = None

    def _headers_too_slow(self) -> None:
        self._header_clock = None
        self._log.info("closed a connection from {peer}: no complete request headers in time", peer=self._peer())
        self.transport.abortConnection()

    def _peer(self) -> str:
        return getattr(self.transport.getPeer(), "host", "unknown")

    def allHeadersReceived(self) -> None:
        self._stop_header_clock()
        request = self.requests[-1]
        if self.length is None:
            self._refuse(411, b"Length Required", "A request body needs a Content-Length")
        elif self.length > self.site.max_body_size:
            self._log.info(
                "refused a request body of {size} bytes from {client}", size=self.length, client=request.client_address()
            )
            self._refuse(413, b"Payload Too Large", f"Request body larger than {self.site.max_body_size} bytes")
        else:
            super().allHeadersReceived()

    def _refuse(self, code: int, phrase: bytes, error: str) -> None:
        """Answer and close, leaving the body unread (the connection cannot be reused after it)."""
        body = orjson.dumps({"error": error})
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        self.transport.write(head % (code, phrase, len(body)) + body)
        self.loseConnection()

    def requestDone(self, request: Request) -> None:
        if self.persistent:
            # before the base class parses a request the client may already have sent
            self._start_header_clock()
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:
        self._stop_header_clock()
        super().connectionLost(reason)


class SyncKitSite(Site):
    requestFactory = SyncKitRequest
    protocol = LimitedChannel
    displayTracebacks = False

    def __init__(
        self,
        root: Resource,
        cors_origin: bytes,
        reactor: Any = None,
        *,
        trusted_proxies: Sequence[IPNetwork] = (),
        header_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_body_size: int = 64 * 1024,
    ) -> None:
        super().__init__(root, timeout=idle_timeout, reactor=reactor)
        self.cors_origin = cors_origin
        self.trusted_proxies = tuple(trusted_proxies)
        self.header_timeout = header_timeout
        self.max_body_size = max_body_size

    def log(self, request: Request) -> None:
        """No access log: health checks poll every 100 ms, and a reverse proxy logs requests."""


class _Counted(Routed):
    """
    One connection on the port, counted against its peer address until it becomes a WebSocket:
    whether the router hands it to Autobahn on its first read, or the site's WebSocket resource
    upgrades it later, the new protocol is set as C{wrappedProtocol}.
    """

    factory: "PerAddressLimit"
    #: the peer address this connection is counted against, or C{None} once it is not
    address: Optional[str] = None
    _protocol: Optional[IProtocol] = None

    @property  # type: ignore[override]
    def wrappedProtocol(self) -> Optional[IProtocol]:
        return self._protocol

    @wrappedProtocol.setter
    def wrappedProtocol(self, protocol: Optional[IProtocol]) -> None:
        self._protocol = protocol
        if isinstance(protocol, WebSocketServerProtocol):
            # WebSockets are counted, by client address, by the server's ConnectionLimiter.
            self.factory.release(self)

    def connectionLost(self, reason: Failure) -> None:
        self.factory.release(self)
        super().connectionLost(reason)


class PerAddressLimit(UpgradeRouter):
    """
    The listening port's factory: the router, with at most C{per_address} connections at once
    from one peer address that are not WebSockets (plain HTTP, or not yet past their first
    read), so that one host cannot use up the process's file descriptors with connections that
    never finish a request.  Over the cap, the connection is closed at once, before anything is
    read.  Trusted proxies are exempt: every client behind them shares their address.  So are
    connections on a unix socket, which have no peer address: only who the socket's file
    permissions let in can connect (a reverse proxy, typically), and they would all share one.
    """

    protocol = _Counted

    def __init__(
        self,
        site: Site,
        websockets: Mapping[bytes, WebSocketServerFactory],
        per_address: int,
        exempt: Sequence[IPNetwork] = (),
    ) -> None:
        super().__init__(site, websockets)
        self._per_address = per_address
        self._exempt = tuple(exempt)
        self._open: dict[str, int] = {}

    def buildProtocol(self, addr: IAddress) -> Optional[_Counted]:  # type: ignore[override]
        host: Optional[str] = getattr(addr, "host", None)
        if host is not None and not is_trusted(host, self._exempt):
            if self._open.get(host, 0) >= self._per_address:
                return None
            self._open[host] = self._open.get(host, 0) + 1
        else:
            host = None
        protocol = self.protocol(self, addr)
        protocol.address = host
        return protocol

    def release(self, protocol: _Counted) -> None:
        """Stop counting C{protocol}'s connection (once: later calls do nothing)."""
        host, protocol.address = protocol.address, None
        if host is not None:
            count = self._open[host] - 1
            if count:
                self._open[host] = count
            else:
                del self._open[host]


def json_body(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return orjson.dumps(value)


def read_json(request: Request) -> Optional[dict[str, Any]]:
    """The request body as a JSON object, or C{None} if it is not one."""
    try:
        value = orjson.loads(request.content.read())
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class JsonResource(Resource):
    """A leaf that answers unknown methods and sub-paths with JSON errors."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        if request.postpath and request.postpath != [b""]:
            return json_body(request, {"error": "Not Found"}, 404)
        return super().render(request)


class NotFound(JsonResource):
    def render(self, request: Request) -> bytes:
        return json_body(request, {"error": "Not Found"}, 404)


class Info(JsonResource):
    def render_GET(self, request: Request) -> bytes:
        return json_body(
            request,
            {
                "name": "SyncKit Server",
                "version": __version__,
                "description": "Production-ready WebSocket sync server",
                "endpoints": {"health": "/health", "ws": "/ws", "auth": "/auth"},
                "features": {
                    "websocket": "Real-time sync via WebSocket",
                    "auth": "JWT authentication",
                    "sync": "Delta-based document synchronization",
                    "crdt": "LWW conflict resolution",
                },
            },
        )


class Health(JsonResource):
    """
    Always 200 while the process lives; cheap, never rate-limited (pollers hit it often).
    ``/health/ready`` below it checks the backends.

    Anonymous callers get counts only.  The reference lists every cached document with its
    client-supplied ``lastModified``, which made an anonymous request cost as much as the
    documents' ids and timestamps weigh (hundreds of megabytes) and told anyone which documents
    exist; that list is kept for a caller with an API key in ``X-API-Key``, and for the metrics
    listener (C{detailed}), which is not meant to be public.
    """

    isLeaf = False

    def __init__(self, server: SyncServer, api_keys: Sequence[str], detailed: bool = False) -> None:
        super().__init__()
        self._server = server
        self._api_keys = [key.encode("utf-8") for key in api_keys]
        self._detailed = detailed
        self.putChild(b"ready", Ready(server))
        self.putChild(b"live", Live())

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else NotFound()

    def _authorized(self, request: Request) -> bool:
        given = request.getHeader(API_KEY_HEADER)
        # every key compared, in constant time, so timing tells nothing about any of them
        return given is not None and sum(hmac.compare_digest(given, key) for key in self._api_keys) > 0

    def render_GET(self, request: Request) -> bytes:
        server = self._server
        now = server.clock.seconds()
        stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        body: dict[str, Any] = {
            "status": "healthy",
            "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "version": __version__,
            "uptime": now - server.started,
        }
        if self._detailed or self._authorized(request):
            body.update(server.stats())
        else:
            body["connections"] = {"totalConnections": len(server.sessions)}
            body["documents"] = {"totalDocuments": len(server.engine.registry)}
        return json_body(request, body)


class Rooms(JsonResource):
    """The demo's room list: cached documents named ``room:<id>`` (not ``:text:``), and ``wordwall``."""

    def __init__(self, server: SyncServer) -> None:
        super().__init__()
        self._server = server

    def render_GET(self, request: Request) -> bytes:
        registry = self._server.engine.registry

        def room(doc_id: str, name: str) -> dict[str, Any]:
            doc = registry.peek(doc_id)
            return {"id": name, "subscriberCount": len(registry.subscribers(doc_id)), "lastModified": doc and doc.last_modified}

        rooms = [
            room(doc.id, doc.id[len("room:") :])
            for doc in registry.documents()
            if doc.id.startswith("room:") and ":text:" not in doc.id
        ]
        return json_body(
            request,
            {
                "rooms": rooms,
                "totalConnections": len(self._server.sessions),
                "totalRooms": len(rooms),
                "wordwall": room("wordwall", "wordwall") if registry.peek("wordwall") else None,
            },
        )


class AuthRoute(JsonResource):
    """
    One ``/auth/*`` route: a function of (server, request, JSON body) -> (status, body), or a
    Deferred of it when checking a token may need the identity provider's keys fetched.
    """

    _log = Logger()

    def __init__(self, server: SyncServer, method: bytes, handler: Callable[..., Answer]) -> None:
        super().__init__()
        self._server = server
        self._method = method
        self._handler = handler

    def render(self, request: Request) -> Any:
        if request.method != self._method:
            return json_body(request, {"error": "Method Not Allowed"}, 405)
        body = read_json(request) if self._method == b"POST" else {}
        if body is None:
            return json_body(request, {"error": "Request body must be a JSON object"}, 400)
        answer = self._handler(self._server, request, body)
        if isinstance(answer, Deferred):
            return answer_later(request, answer.addErrback(self._failed, request))
        code, value = answer
        return json_body(request, value, code)

    def _failed(self, failure: Failure, request: Request) -> tuple[int, Any]:
        self._log.failure("{path} failed", failure, path=request.path)
        return 500, {"error": "Internal server error"}


def _token_refused(failure: Failure, answer: tuple[int, Any]) -> tuple[int, Any]:
    failure.trap(InvalidToken)
    return answer


def login(server: SyncServer, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
    """
    Any email and password are accepted, and any permissions asked for are signed, an
    administrator's included: this is the reference's demo login, served only with demo-login.
    """
    email, password = body.get("email"), body.get("password")
    if not email or not password:
        return 400, {"error": "Email and password required"}
    requested = body.get("permissions") if isinstance(body.get("permissions"), dict) else {}
    if requested.get("isAdmin"):
        permissions = {"canRead": [], "canWrite": [], "isAdmin": True}
    else:
        permissions = {
            "canRead": requested.get("canRead") or [],
            "canWrite": requested.get("canWrite") or [],
            "isAdmin": False,
        }
    user_id = f"user-{server.now_ms()}"
    return 200, {
        "userId": user_id,
        "email": email,
        "accessToken": server.tokens.access_token(user_id, email, permissions),
        "refreshToken": server.tokens.refresh_token(user_id, email, permissions),
        "permissions": permissions,
    }


def refresh(server: SyncServer, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
    """
    A refresh token, once, for a new pair.  Unlike the reference, an access token is refused,
    and the permissions are the ones the refresh token was issued with, never a caller's.
    """
    token = body.get("refreshToken")
    if not token:
        return 400, {"error": "Refresh token required"}
    try:
        claims = server.tokens.redeem(token)
    except InvalidToken:
        return 401, {"error": "Invalid or expired refresh token"}
    user_id, email, permissions = claims.get("userId"), claims.get("email") or "", claims.get("permissions")
    return 200, {
        "accessToken": server.tokens.access_token(user_id, email, permissions),
        "refreshToken": server.tokens.refresh_token(user_id, email, permissions),
    }


def me(server: SyncServer, request: Request, body: dict[str, Any]) -> Answer:
    header = request.getHeader(b"Authorization")
    if not header:
        return 401, {"error": "Missing Authorization header"}
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme != "Bearer" or not token:
        return 401, {"error": "Invalid Authorization header format"}

    def found(claims: dict[str, Any]) -> tuple[int, Any]:
        identity = server.tokens.identity_from(claims)
        return 200, {"userId": identity.user_id, "email": claims.get("email"), "permissions": identity.permissions_claim}

    d = server.tokens.verify_fetching(token).addCallback(found)
    return d.addErrback(_token_refused, (401, {"error": "Invalid or expired token"}))


def verify(server: SyncServer, request: Request, body: dict[str, Any]) -> Answer:
    token = body.get("token")
    if not token:
        return 400, {"error": "Token required"}

    def found(claims: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"valid": True, "userId": server.tokens.identity_from(claims).user_id, "expiresAt": claims.get("exp")}

    d = server.tokens.verify_fetching(token).addCallback(found)
    return d.addErrback(_token_refused, (200, {"valid": False}))


def answer_later(request: Request, answer: "Deferred[tuple[int, Any]]") -> Any:
    """
    Answer C{request} with the (status, JSON body) that C{answer} fires with, unless the client
    has gone by then (C{Request.notifyFinish} fails when the connection is lost first); returns
    what C{render} returns for that.
    """
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def finish(result: tuple[int, Any]) -> None:
        if not gone:
            code, value = result
            request.write(json_body(request, value, code))
            request.finish()

    answer.addCallback(finish)
    return NOT_DONE_YET


class MetricsPage(Resource):
    """``GET /metrics``: the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


def metrics_site(metrics: Metrics, server: Optional[SyncServer] = None) -> Site:
    """
    The separate metrics listener's site: ``/metrics``, and, given the server, ``/health``
    with every detail, as this listener is for operators only.
    """
    routes: dict[bytes, Resource] = {b"metrics": MetricsPage(metrics)}
    if server is not None:
        routes[b"health"] = Health(server, (), detailed=True)
    site = Site(Folder(routes))
    site.noisy = False
    return site


class Live(JsonResource):
    """
    ``GET /health/live``: 200 whenever the reactor answers at all, for a liveness probe.  It
    touches nothing else, so a slow or failing backend (which ``/health/ready`` reports) never
    gets a live process restarted.
    """

    def render_GET(self, request: Request) -> bytes:
        return json_body(request, {"status": "alive"})


class Ready(JsonResource):
    """
    ``GET /health/ready``: 200 when storage and pub/sub answer a ping, else 503, with each
    one's status and round trip, for load balancers and orchestrators.  Both are asked at once,
    each within the backend timeout.
    """

    def __init__(self, server: SyncServer) -> None:
        super().__init__()
        self._server = server

    def render_GET(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._report())
        return answer_later(request, d.addCallback(lambda report: (200 if report["status"] == "ready" else 503, report)))

    async def _report(self) -> dict[str, Any]:
        storage, pubsub = self._server.storage, self._server.pubsub
        results = await DeferredList([storage.ping(), pubsub.ping()], consumeErrors=True)
        report: dict[str, Any] = {"status": "ready"}
        for (ok, outcome), key, backend in zip(results, ("storage", "pubsub"), (storage, pubsub)):
            if ok:
                report[key] = {"backend": backend.name, "ok": True, "latencyMs": round(outcome * 1000, 3)}
            else:
                report[key] = {"backend": backend.name, "ok": False, "error": outcome.getErrorMessage()}
                report["status"] = "unavailable"
        return report


class ClearAll(JsonResource):
    """``POST /_test/clear``: forget every document, so a test suite can isolate its tests."""

    _log = Logger()

    def __init__(self, server: SyncServer) -> None:
        super().__init__()
        self._server = server

    def render_POST(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._server.engine.clear())
        return answer_later(request, d.addCallbacks(lambda _: (200, {"cleared": True}), self._failed))

    def _failed(self, failure: Failure) -> tuple[int, Any]:
        self._log.failure("clearing all documents failed", failure)
        return 500, {"error": "Clear failed"}


class Root(Resource):
    """Routes by path segment; ``/`` itself is the server description."""

    def __init__(self, children: dict[bytes, Resource]) -> None:
        super().__init__()
        self._info = Info()
        self._not_found = NotFound()
        self._routes = children

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self._info
        return self._routes.get(path, self._not_found)


class Folder(Resource):
    def __init__(self, children: dict[bytes, Resource]) -> None:
        super().__init__()
        self._routes = children
        self._not_found = NotFound()

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._routes.get(path, self._not_found)

    def render(self, request: Request) -> bytes:
        return json_body(request, {"error": "Not Found"}, 404)


def make_listener(server: SyncServer, config: Config) -> PerAddressLimit:
    """
    The protocol factory of every main listener (each --listen endpoint): the site, with
    WebSocket upgrades taken straight to Autobahn, behind the per-address cap on connections
    that are not WebSockets.  One factory for all of them, so the cap and the server are shared.
    """
    websockets: dict[bytes, WebSocketServerFactory] = {b"/ws": SyncFactory(server, config)}
    if config.echo_endpoint:
        websockets[b"/echo"] = echo_factory(config)
    site = make_site(server, config, websockets)
    per_address = config.max_http_connections_per_ip or config.max_connections_per_ip
    return PerAddressLimit(site, websockets, per_address, config.trusted_proxies)


def make_site(server: SyncServer, config: Config, websockets: dict[bytes, WebSocketServerFactory]) -> Site:
    routes: dict[bytes, Resource] = {path[1:]: WebSocketResource(factory) for path, factory in websockets.items()}
    auth = {b"me": AuthRoute(server, b"GET", me), b"verify": AuthRoute(server, b"POST", verify)}
    if config.demo_login:
        auth[b"login"] = AuthRoute(server, b"POST", login)
        auth[b"refresh"] = AuthRoute(server, b"POST", refresh)
    routes.update({b"health": Health(server, config.api_keys), b"rooms": Rooms(server), b"auth": Folder(auth)})
    if not metrics_endpoints(config):
        routes[b"metrics"] = MetricsPage(server.metrics)
    if config.test_endpoints:
        routes[b"_test"] = Folder({b"clear": ClearAll(server)})
    return SyncKitSite(
        Root(routes),
        config.cors_origin.encode("latin-1"),
        server.clock,
        trusted_proxies=config.trusted_proxies,
        header_timeout=config.http_header_timeout / 1000,
        idle_timeout=config.http_idle_timeout / 1000,
        max_body_size=config.max_http_body_size,
    )
