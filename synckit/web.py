"""
The HTTP side of the one listening port (PROTOCOL.md sections 1.2 and 1.3): ``/ws`` for
WebSockets, ``/``, ``/health`` and ``/health/ready``, the ``/auth`` routes, ``/rooms``, and, only when switched on,
``POST /_test/clear``.  Every response carries the reference's CORS and security headers.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Optional

import orjson
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synckit import __version__
from synckit.auth import InvalidToken
from synckit.config import Config
from synckit.metrics import Metrics
from synckit.server import SyncServer
from synckit.upgrade import UpgradeRouter
from synckit.websocket import SyncFactory, echo_factory

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
    """Adds CORS to every response and answers preflights, then the security headers (1.3)."""

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


class SyncKitSite(Site):
    requestFactory = SyncKitRequest
    displayTracebacks = False

    def __init__(self, root: Resource, cors_origin: bytes) -> None:
        super().__init__(root)
        self.cors_origin = cors_origin

    def log(self, request: Request) -> None:
        """No access log: health checks poll every 100 ms, and a reverse proxy logs requests."""


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
    """

    isLeaf = False

    def __init__(self, server: SyncServer) -> None:
        super().__init__()
        self._server = server
        self.putChild(b"ready", Ready(server))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else NotFound()

    def render_GET(self, request: Request) -> bytes:
        now = self._server.clock.seconds()
        stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        return json_body(
            request,
            {
                "status": "healthy",
                "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
                "version": __version__,
                "uptime": now - self._server.started,
                **self._server.stats(),
            },
        )


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
    """One ``/auth/*`` route: a function of (server, request, JSON body) -> (status, body)."""

    def __init__(self, server: SyncServer, method: bytes, handler: Callable[..., tuple[int, Any]]) -> None:
        super().__init__()
        self._server = server
        self._method = method
        self._handler = handler

    def render(self, request: Request) -> bytes:
        if request.method != self._method:
            return json_body(request, {"error": "Method Not Allowed"}, 405)
        body = read_json(request) if self._method == b"POST" else {}
        if body is None:
            return json_body(request, {"error": "Request body must be a JSON object"}, 400)
        code, value = self._handler(self._server, request, body)
        return json_body(request, value, code)


def login(server: SyncServer, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
    """Any email and password are accepted: this is the reference's demo login."""
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
        "refreshToken": server.tokens.refresh_token(user_id),
        "permissions": permissions,
    }


def refresh(server: SyncServer, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
    token = body.get("refreshToken")
    if not token:
        return 400, {"error": "Refresh token required"}
    try:
        claims = server.tokens.verify(token)
    except InvalidToken:
        return 401, {"error": "Invalid or expired refresh token"}
    user_id = claims.get("userId")
    return 200, {
        "accessToken": server.tokens.access_token(user_id, claims.get("email") or "", claims.get("permissions")),
        "refreshToken": server.tokens.refresh_token(user_id),
    }


def me(server: SyncServer, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
    header = request.getHeader(b"Authorization")
    if not header:
        return 401, {"error": "Missing Authorization header"}
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme != "Bearer" or not token:
        return 401, {"error": "Invalid Authorization header format"}
    try:
        claims = server.tokens.verify(token)
    except InvalidToken:
        return 401, {"error": "Invalid or expired token"}
    return 200, {"userId": claims.get("userId"), "email": claims.get("email"), "permissions": claims.get("permissions")}


def verify(server: SyncServer, request: Request, body: dict[str, Any]) -> tuple[int, Any]:
    token = body.get("token")
    if not token:
        return 400, {"error": "Token required"}
    try:
        claims = server.tokens.verify(token)
    except InvalidToken:
        return 200, {"valid": False}
    return 200, {"valid": True, "userId": claims.get("userId"), "expiresAt": claims.get("exp")}


def finish_json(request: Request, value: Any, code: int = 200) -> None:
    """Answer a request rendered with NOT_DONE_YET, unless the client has gone."""
    if not request.finished and not request._disconnected:
        request.write(json_body(request, value, code))
        request.finish()


class MetricsPage(Resource):
    """``GET /metrics``: the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


def metrics_site(metrics: Metrics) -> Site:
    """The separate metrics listener's site: ``/metrics`` and nothing else."""
    site = Site(Folder({b"metrics": MetricsPage(metrics)}))
    site.noisy = False
    return site


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
        d.addCallback(lambda report: finish_json(request, report, 200 if report["status"] == "ready" else 503))
        return NOT_DONE_YET

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
        d.addCallbacks(lambda _: finish_json(request, {"cleared": True}), self._failed, errbackArgs=(request,))
        return NOT_DONE_YET

    def _failed(self, failure: Failure, request: Request) -> None:
        self._log.failure("clearing all documents failed", failure)
        finish_json(request, {"error": "Clear failed"}, 500)


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


def make_listener(server: SyncServer, config: Config) -> UpgradeRouter:
    """The one port's protocol factory: the site, with WebSocket upgrades taken straight to Autobahn."""
    websockets: dict[bytes, WebSocketServerFactory] = {b"/ws": SyncFactory(server, config)}
    if config.echo_endpoint:
        websockets[b"/echo"] = echo_factory(config)
    return UpgradeRouter(make_site(server, config, websockets), websockets)


def make_site(server: SyncServer, config: Config, websockets: dict[bytes, WebSocketServerFactory]) -> Site:
    routes: dict[bytes, Resource] = {path[1:]: WebSocketResource(factory) for path, factory in websockets.items()}
    routes.update({
        b"health": Health(server),
        b"rooms": Rooms(server),
        b"auth": Folder(
            {
                b"login": AuthRoute(server, b"POST", login),
                b"refresh": AuthRoute(server, b"POST", refresh),
                b"me": AuthRoute(server, b"GET", me),
                b"verify": AuthRoute(server, b"POST", verify),
            }
        ),
    })
    if config.metrics_port is None:
        routes[b"metrics"] = MetricsPage(server.metrics)
    if config.test_endpoints:
        routes[b"_test"] = Folder({b"clear": ClearAll(server)})
    return SyncKitSite(Root(routes), config.cors_origin.encode("latin-1"))
