"""
Identity-provider tokens checked against a JWKS (synckit.auth.JwksKeys) served by a test HTTP
server on 127.0.0.1, fetched with Twisted's client: rotation, the refresh floor, pinned
algorithms and every kind of bad token.  Token times and the floor run on a Clock.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from synckit.auth import Identity, InvalidToken, JwksKeys, Tokens, UnknownKey
from tests.helpers import SECRET
from tests.test_auth import NOW, b64, hs256_with, pem, unsigned

ISSUER = "https://idp.example/realms/synckit"
SHARED = b"a symmetric key of 32 bytes, too"


def jwk(private_key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    """The public JWK of C{private_key}, as an identity provider publishes it."""
    algorithm = {rsa.RSAPrivateKey: jwt.algorithms.RSAAlgorithm, ec.EllipticCurvePrivateKey: jwt.algorithms.ECAlgorithm}
    for kind, cls in algorithm.items():
        if isinstance(private_key, kind):
            data = json.loads(cls.to_jwk(private_key.public_key()))
            break
    else:
        data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private_key.public_key()))
    return {**data, "kid": kid, "use": "sig", **extra}


class JwksPage(Resource):
    """The provider's JWKS; tests change C{keys} to rotate, C{status} to fail it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0

    def render_GET(self, request: Request) -> bytes:
        self.fetches += 1
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


class JwksTests(TestCase):
    def setUp(self) -> None:
        self.page = JwksPage()
        port = reactor.listenTCP(0, Site(self.page), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.clock = Clock()
        self.clock.advance(NOW)
        url = f"http://127.0.0.1:{port.getHost().port}/certs"
        self.jwks = JwksKeys(url, Agent(reactor), self.clock)
        self.tokens = Tokens(SECRET, 3600, 7200, self.clock, jwks=self.jwks, issuer=ISSUER, audience=("synckit",))
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.page.keys = [jwk(self.rsa, "k1", alg="RS256")]

    def claims(self, **extra: Any) -> dict[str, Any]:
        return {"sub": "alice", "iss": ISSUER, "aud": "synckit", "exp": NOW + 300, "permissions": {"canRead": ["d"]}, **extra}

    def sign(self, private_key: Any = None, kid: str = "k1", algorithm: str = "RS256", **extra: Any) -> str:
        return jwt.encode(self.claims(**extra), private_key or self.rsa, algorithm=algorithm, headers={"kid": kid})

    def run_async(self, f: Any) -> Deferred:
        return ensureDeferred(f())

    async def refused(self, token: str) -> None:
        try:
            await self.tokens.authenticate(token)
        except InvalidToken:
            return
        self.fail(f"accepted {token}")

    def test_identity_provider_token(self) -> Deferred:
        """
        The first token fetches the keys; it authenticates as its sub, with the permissions claim
        and its expiry.  Later tokens of a known key are checked without a fetch, synchronously too.
        """

        async def go() -> None:
            identity = await self.tokens.authenticate(self.sign())
            self.assertEqual(identity, Identity("alice", identity.permissions, {"canRead": ["d"]}, NOW + 300.0))
            self.assertTrue(identity.permissions.readable("d"))
            self.assertEqual(self.tokens.identity(self.sign(sub="bob")).user_id, "bob")
            await self.tokens.authenticate(self.sign(sub="carol"))
            self.assertEqual(self.page.fetches, 1)

        return self.run_async(go)

    def test_key_rotation(self) -> Deferred:
        """A token signed with a key added since the last fetch makes one fetch, and is accepted."""

        async def go() -> None:
            await self.tokens.authenticate(self.sign())
            new = ec.generate_private_key(ec.SECP256R1())
            self.page.keys = [jwk(new, "k2")]
            self.clock.advance(31)
            token = self.sign(new, "k2", "ES256")
            self.assertRaises(UnknownKey, self.tokens.identity, token)
            self.assertEqual((await self.tokens.authenticate(token)).user_id, "alice")
            self.assertEqual(self.page.fetches, 2)
            await self.refused(self.sign())  # k1 was withdrawn
            self.assertEqual(self.page.fetches, 2)  # and within the floor, not fetched for

        return self.run_async(go)

    def test_unknown_kid_fetches_at_most_once_per_interval(self) -> Deferred:
        """
        Tokens naming made-up keys are refused, and cost at most one fetch per 30 s however many
        arrive; concurrent ones share the fetch under way.
        """

        async def go() -> None:
            await self.tokens.authenticate(self.sign())
            self.clock.advance(30)
            await self.refused(self.sign(kid="made-up-1"))
            for i in range(5):
                await self.refused(self.sign(kid=f"made-up-{i + 2}"))
            self.assertEqual(self.page.fetches, 2)
            self.clock.advance(30)
            waits = [self.tokens.authenticate(self.sign(kid=f"other-{i}")) for i in range(3)]
            for d in waits:
                await self.assertFailure(d, InvalidToken)
            self.assertEqual(self.page.fetches, 3)

        return self.run_async(go)

    def test_bad_tokens_refused(self) -> Deferred:
        """alg none, HS256 keyed with the public key, wrong aud or iss, expired, not yet valid, unknown kid."""

        async def go() -> None:
            await self.tokens.authenticate(self.sign())
            for token in (
                unsigned(self.claims()),
                hs256_with(pem(self.rsa), self.claims()),
                self.sign(aud="another-app"),
                self.sign(iss="https://evil.example/"),
                self.sign(exp=NOW - 1),
                self.sign(nbf=NOW + 60),
                self.sign(kid="nobody"),
                self.sign(algorithm="RS384"),
                self.sign(rsa.generate_private_key(65537, 2048)),
            ):
                await self.refused(token)

        return self.run_async(go)

    def test_pinned_algorithm_and_skipped_keys(self) -> Deferred:
        """
        A key's algorithm comes from the JWKS: an RSA key published for PS256 does not verify
        RS256; a symmetric (oct) key and an encryption key in the set are never used.
        """

        async def go() -> None:
            ed = ed25519.Ed25519PrivateKey.generate()
            self.page.keys = [
                jwk(self.rsa, "k1", alg="PS256"),
                jwk(ed, "ed"),
                jwk(ec.generate_private_key(ec.SECP256R1()), "enc", use="enc"),
                {"kty": "oct", "kid": "shared", "k": b64(SHARED), "alg": "HS256"},
            ]
            self.assertEqual((await self.tokens.authenticate(self.sign(algorithm="PS256"))).user_id, "alice")
            self.assertEqual((await self.tokens.authenticate(self.sign(ed, "ed", "EdDSA"))).user_id, "alice")
            self.assertRaises(InvalidToken, self.tokens.identity, self.sign(algorithm="RS256"))
            oct_token = jwt.encode(self.claims(), SHARED, algorithm="HS256", headers={"kid": "shared"})
            self.assertRaises(InvalidToken, self.tokens.identity, oct_token)

        return self.run_async(go)

    def test_failed_fetch_keeps_known_keys(self) -> Deferred:
        """A provider answering 500 (or nonsense) leaves the keys already fetched in use."""

        async def go() -> None:
            await self.tokens.authenticate(self.sign())
            self.page.status = 500
            self.clock.advance(30)
            await self.refused(self.sign(kid="k9"))
            self.assertEqual(self.page.fetches, 2)
            self.assertEqual((await self.tokens.authenticate(self.sign())).user_id, "alice")

        return self.run_async(go)
