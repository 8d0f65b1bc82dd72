"""The HTTP routes and headers (docs/protocol.md section 1), through the real Site on a port."""

from __future__ import annotations

import json
from typing import Any, Optional

import jwt
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.service import SyncKitService
from synckit.storage.memory import MemoryStorage
from synckit.web import answer_later
from tests.helpers import SECRET, config


class Response:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class WebTests(TestCase):
    async def serve(self, **overrides: Any) -> int:
        service = SyncKitService(
            config(port=0, host="127.0.0.1", **overrides), reactor, MemoryStorage(), LocalPubSub(LocalBus(reactor))
        )
        service.startService()
        self.addCleanup(service.stopService)
        await service.started
        return service.ports[0].getHost().port

    async def request(
        self, port: int, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]] = None
    ) -> Response:
        from io import BytesIO

        raw = Headers({k: [v] for k, v in (headers or {}).items()})
        producer = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            producer = FileBodyProducer(BytesIO(data))
            raw.setRawHeaders("Content-Type", ["application/json"])
        response = await Agent(reactor).request(method.encode(), f"http://127.0.0.1:{port}{path}".encode(), raw, producer)
        return Response(response.code, response.headers, await readBody(response))

    def run_async(self, f) -> Deferred:
        return ensureDeferred(f())

    def test_security_and_cors_headers(self) -> Deferred:
        """Every response carries CORS (origin *) and the reference's security headers."""

        async def go() -> None:
            port = await self.serve()
            for path in ("/health", "/", "/no-such-route"):
                r = await self.request(port, "GET", path)
                self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
                self.assertEqual(r.header("Access-Control-Allow-Credentials"), "true")
                self.assertEqual(r.header("X-Frame-Options"), "DENY")
                self.assertEqual(r.header("X-Content-Type-Options"), "nosniff")
                self.assertEqual(r.header("Referrer-Policy"), "strict-origin-when-cross-origin")
                self.assertIn("frame-ancestors 'none'", r.header("Content-Security-Policy"))
                self.assertEqual(r.header("Content-Type"), "application/json")

        return self.run_async(go)

    def test_preflight(self) -> Deferred:
        """OPTIONS answers 204 with the allowed methods, echoes requested headers, no security headers."""

        async def go() -> None:
            port = await self.serve()
            r = await self.request(port, "OPTIONS", "/auth/login", headers={"Access-Control-Request-Headers": "content-type"})
            self.assertEqual(r.code, 204)
            self.assertEqual(r.header("Access-Control-Allow-Methods"), "GET,HEAD,PUT,POST,DELETE,PATCH")
            self.assertEqual(r.header("Access-Control-Allow-Headers"), "content-type")
            self.assertIsNone(r.header("X-Frame-Options"))

        return self.run_async(go)

    def test_configured_origin(self) -> Deferred:
        """With a configured origin, Allow-Origin is sent only to that origin, with Vary: Origin."""

        async def go() -> None:
            port = await self.serve(cors_origin="https://app.example")
            good = await self.request(port, "GET", "/health", headers={"Origin": "https://app.example"})
            other = await self.request(port, "GET", "/health", headers={"Origin": "https://evil.example"})
            self.assertEqual(good.header("Access-Control-Allow-Origin"), "https://app.example")
            self.assertIsNone(other.header("Access-Control-Allow-Origin"))
            self.assertEqual(other.header("Vary"), "Origin")

        return self.run_async(go)

    def test_login_issues_working_tokens(self) -> Deferred:
        """With demo-login, login returns HS256 tokens with the reference's claims; /auth/me and /auth/verify accept them."""

        async def go() -> None:
            port = await self.serve(demo_login=True)
            r = await self.request(port, "POST", "/auth/login", {"email": "a@example.com", "password": "pw", "permissions": {"canRead": ["d1"]}})
            self.assertEqual(r.code, 200)
            body = r.json()
            claims = jwt.decode(body["accessToken"], SECRET, algorithms=["HS256"])
            self.assertEqual(claims["userId"], body["userId"])
            self.assertEqual(claims["permissions"], {"canRead": ["d1"], "canWrite": [], "isAdmin": False})
            self.assertEqual(claims["exp"] - claims["iat"], 24 * 3600)
            me = await self.request(port, "GET", "/auth/me", headers={"Authorization": f"Bearer {body['accessToken']}"})
            self.assertEqual((me.code, me.json()["email"]), (200, "a@example.com"))
            verify = await self.request(port, "POST", "/auth/verify", {"token": body["accessToken"]})
            self.assertEqual(verify.json(), {"valid": True, "userId": body["userId"], "expiresAt": claims["exp"]})
            admin = await self.request(port, "POST", "/auth/login", {"email": "b", "password": "c", "permissions": {"isAdmin": True}})
            self.assertEqual(admin.json()["permissions"], {"canRead": [], "canWrite": [], "isAdmin": True})

        return self.run_async(go)

    def test_auth_errors(self) -> Deferred:
        """Missing fields, bad headers and bad tokens get the reference's status codes and messages."""

        async def go() -> None:
            port = await self.serve(demo_login=True)
            cases = [
                ("POST", "/auth/login", {"email": "a"}, None, 400, {"error": "Email and password required"}),
                ("POST", "/auth/refresh", {}, None, 400, {"error": "Refresh token required"}),
                ("POST", "/auth/refresh", {"refreshToken": "x.y.z"}, None, 401, {"error": "Invalid or expired refresh token"}),
                ("GET", "/auth/me", None, None, 401, {"error": "Missing Authorization header"}),
                ("GET", "/auth/me", None, {"Authorization": "Token abc"}, 401, {"error": "Invalid Authorization header format"}),
                ("GET", "/auth/me", None, {"Authorization": "Bearer abc"}, 401, {"error": "Invalid or expired token"}),
                ("POST", "/auth/verify", {}, None, 400, {"error": "Token required"}),
                ("POST", "/auth/verify", {"token": "abc"}, None, 200, {"valid": False}),
                ("POST", "/auth/login", b"not json", None, 400, {"error": "Request body must be a JSON object"}),
                ("GET", "/auth/login", None, None, 405, {"error": "Method Not Allowed"}),
            ]
            for method, path, body, headers, code, expected in cases:
                r = await self.request(port, method, path, body, headers)
                self.assertEqual((r.code, r.json()), (code, expected), (method, path, body))

        return self.run_async(go)

    def test_refresh(self) -> Deferred:
        """A refresh token buys a new access token and a new refresh token for the same user."""

        async def go() -> None:
            port = await self.serve(demo_login=True)
            login = (await self.request(port, "POST", "/auth/login", {"email": "a", "password": "b"})).json()
            r = await self.request(port, "POST", "/auth/refresh", {"refreshToken": login["refreshToken"]})
            self.assertEqual(r.code, 200)
            claims = jwt.decode(r.json()["accessToken"], SECRET, algorithms=["HS256"])
            self.assertEqual(claims["userId"], login["userId"])

        return self.run_async(go)

    def test_rooms(self) -> Deferred:
        """/rooms lists nothing on a fresh server, with the reference's shape."""

        async def go() -> None:
            port = await self.serve()
            r = await self.request(port, "GET", "/rooms")
            self.assertEqual(r.json(), {"rooms": [], "totalConnections": 0, "totalRooms": 0, "wordwall": None})

        return self.run_async(go)

    def test_demo_login_off_by_default(self) -> Deferred:
        """
        Without demo-login, nobody can have an administrator token signed: /auth/login and
        /auth/refresh are not served (404), whatever is asked for; /auth/me and /auth/verify are.
        """

        async def go() -> None:
            port = await self.serve()
            ask = {"email": "e", "password": "p", "permissions": {"isAdmin": True}}
            login = await self.request(port, "POST", "/auth/login", ask)
            self.assertEqual((login.code, login.json()), (404, {"error": "Not Found"}))
            refresh = await self.request(port, "POST", "/auth/refresh", {"refreshToken": "x"})
            self.assertEqual(refresh.code, 404)
            verify = await self.request(port, "POST", "/auth/verify", {"token": "abc"})
            self.assertEqual((verify.code, verify.json()), (200, {"valid": False}))

        return self.run_async(go)

    def test_refresh_token_works_once(self) -> Deferred:
        """A refresh token is redeemed once; its replay is refused, the refresh token it bought works."""

        async def go() -> None:
            port = await self.serve(demo_login=True)
            login = (await self.request(port, "POST", "/auth/login", {"email": "a", "password": "b"})).json()
            first = await self.request(port, "POST", "/auth/refresh", {"refreshToken": login["refreshToken"]})
            self.assertEqual(first.code, 200)
            replay = await self.request(port, "POST", "/auth/refresh", {"refreshToken": login["refreshToken"]})
            self.assertEqual((replay.code, replay.json()), (401, {"error": "Invalid or expired refresh token"}))
            second = await self.request(port, "POST", "/auth/refresh", {"refreshToken": first.json()["refreshToken"]})
            self.assertEqual(second.code, 200)

        return self.run_async(go)

    def test_refresh_takes_no_access_token(self) -> Deferred:
        """
        /auth/refresh refuses an access token (the reference re-signs it, permissions included),
        and grants the permissions the login granted, never more.
        """

        async def go() -> None:
            port = await self.serve(demo_login=True)
            ask = {"email": "a", "password": "b", "permissions": {"canRead": ["d1"]}}
            login = (await self.request(port, "POST", "/auth/login", ask)).json()
            r = await self.request(port, "POST", "/auth/refresh", {"refreshToken": login["accessToken"]})
            self.assertEqual(r.code, 401)
            forged = jwt.encode({"userId": "x", "permissions": {"isAdmin": True}}, SECRET, algorithm="HS256")
            r = await self.request(port, "POST", "/auth/refresh", {"refreshToken": forged})
            self.assertEqual(r.code, 401)
            r = await self.request(port, "POST", "/auth/refresh", {"refreshToken": login["refreshToken"]})
            claims = jwt.decode(r.json()["accessToken"], SECRET, algorithms=["HS256"])
            self.assertEqual(claims["permissions"], {"canRead": ["d1"], "canWrite": [], "isAdmin": False})

        return self.run_async(go)

    def test_refresh_token_is_not_an_access_token(self) -> Deferred:
        """/auth/me and /auth/verify refuse a refresh token."""

        async def go() -> None:
            port = await self.serve(demo_login=True)
            login = (await self.request(port, "POST", "/auth/login", {"email": "a", "password": "b"})).json()
            me = await self.request(port, "GET", "/auth/me", headers={"Authorization": f"Bearer {login['refreshToken']}"})
            self.assertEqual(me.code, 401)
            verify = await self.request(port, "POST", "/auth/verify", {"token": login["refreshToken"]})
            self.assertEqual(verify.json(), {"valid": False})

        return self.run_async(go)

    def test_health_without_key_has_counts_only(self) -> Deferred:
        """
        Anonymous /health has status, version, uptime and counts, no document list; with a
        configured key in X-API-Key, the reference's details; a wrong key gets counts only.
        """

        async def go() -> None:
            port = await self.serve(api_keys=("admin-key",))
            anonymous = (await self.request(port, "GET", "/health")).json()
            self.assertEqual(set(anonymous), {"status", "timestamp", "version", "uptime", "connections", "documents"})
            self.assertEqual(anonymous["documents"], {"totalDocuments": 0})
            self.assertEqual(anonymous["connections"], {"totalConnections": 0})
            wrong = (await self.request(port, "GET", "/health", headers={"X-API-Key": "nope"})).json()
            self.assertEqual(wrong["documents"], {"totalDocuments": 0})
            detailed = (await self.request(port, "GET", "/health", headers={"X-API-Key": "admin-key"})).json()
            self.assertEqual(detailed["documents"], {"totalDocuments": 0, "documents": []})
            self.assertEqual(detailed["connections"], {"totalConnections": 0, "totalUsers": 0, "totalClients": 0})

        return self.run_async(go)


class AnswerLaterTests(SynchronousTestCase):
    def test_answers_when_ready(self) -> None:
        """An answer that comes later is written as JSON with its status, and the request finished."""
        request, answer = DummyRequest([b""]), Deferred()
        self.assertIs(answer_later(request, answer), NOT_DONE_YET)
        answer.callback((503, {"status": "unavailable"}))
        self.assertEqual((request.responseCode, json.loads(b"".join(request.written))), (503, {"status": "unavailable"}))
        self.assertEqual(request.finished, 1)

    def test_client_gone_before_the_answer(self) -> None:
        """
        A client that disconnects before the answer is ready gets nothing written: the request
        learns it through the public notifyFinish, not Twisted's private disconnect flag.
        """
        channel = DummyChannel()
        request, answer = Request(channel), Deferred()
        answer_later(request, answer)
        request.connectionLost(Failure(ConnectionDone()))
        answer.callback((200, {"late": True}))
        self.assertIsNone(self.successResultOf(answer))  # finishing a lost request would raise
        self.assertEqual((channel.transport.written.getvalue(), request.finished), (b"", 0))
