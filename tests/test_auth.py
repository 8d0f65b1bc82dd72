"""
Token checks without a network (synckit.auth; docs/security.md): public key files, pinned
algorithms, token types, one-time refresh tokens, claims, leeway and the identity's expiry, on a
Clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import tempfile
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synckit.auth import InvalidToken, SpentTokens, Tokens, load_public_key
from synckit.config import DEFAULT_JWT_SECRET, ConfigError, load
from tests.helpers import SECRET

NOW = 1_700_000_000


def pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """An ``alg: none`` token."""
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}."


def hs256_with(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token whose HMAC key is C{key} (pyjwt refuses to sign one with a PEM key)."""
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


class KeyFileCase(SynchronousTestCase):
    def key_file(self, private_key: Any) -> str:
        fd, path = tempfile.mkstemp(suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(pem(private_key))
        self.addCleanup(os.unlink, path)
        return path

    def tokens(self, private_key: Any, **options: Any) -> Tokens:
        self.clock = Clock()
        self.clock.advance(NOW)
        return Tokens(SECRET, 3600, 7200, self.clock, public_key=load_public_key(self.key_file(private_key)), **options)


class PublicKeyFileTests(KeyFileCase):
    def test_each_key_type_verifies_its_algorithm(self) -> None:
        """RSA keys verify RS256, P-256 keys ES256, Ed25519 keys EdDSA; the user may be in sub."""
        for private_key, algorithm in (
            (rsa.generate_private_key(65537, 2048), "RS256"),
            (ec.generate_private_key(ec.SECP256R1()), "ES256"),
            (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        ):
            tokens = self.tokens(private_key)
            token = jwt.encode({"sub": "alice", "exp": NOW + 60, "permissions": {"canRead": ["d"]}}, private_key, algorithm=algorithm)
            identity = tokens.identity(token)
            self.assertEqual((identity.user_id, identity.expires_at), ("alice", NOW + 60.0))
            self.assertTrue(identity.permissions.readable("d"))

    def test_algorithm_is_the_keys_not_the_tokens(self) -> None:
        """
        A token cannot pick how the key is used: ``alg: none``, HS256 with the public key as its
        secret, and another RSA algorithm than the key's are all refused.
        """
        private_key = rsa.generate_private_key(65537, 2048)
        tokens = self.tokens(private_key)
        claims = {"sub": "mallory", "exp": NOW + 60, "permissions": {"isAdmin": True}}
        for token in (
            unsigned(claims),
            hs256_with(pem(private_key), claims),
            jwt.encode(claims, private_key, algorithm="RS512"),
            jwt.encode(claims, private_key, algorithm="PS256"),
        ):
            self.assertRaises(InvalidToken, tokens.identity, token)

    def test_development_secret_refused_beside_an_identity_provider(self) -> None:
        """With a key file configured, tokens signed with the public development secret are refused."""
        self.clock = Clock()
        key = load_public_key(self.key_file(ec.generate_private_key(ec.SECP256R1())))
        tokens = Tokens(DEFAULT_JWT_SECRET, 3600, 7200, self.clock, public_key=key)
        self.assertRaises(InvalidToken, tokens.identity, jwt.encode({"userId": "u"}, DEFAULT_JWT_SECRET, algorithm="HS256"))

    def test_identity_provider_tokens_must_expire(self) -> None:
        """A token from a key file without exp is refused (the shared secret's need none, as in the reference)."""
        private_key = ec.generate_private_key(ec.SECP256R1())
        tokens = self.tokens(private_key)
        self.assertRaises(InvalidToken, tokens.identity, jwt.encode({"sub": "a"}, private_key, algorithm="ES256"))
        self.assertEqual(tokens.identity(jwt.encode({"userId": "u"}, SECRET, algorithm="HS256")).expires_at, None)

    def test_bad_key_file_stops_the_server(self) -> None:
        """A missing file, or one that is not a public key, is a config error naming the setting."""
        path = self.key_file(ec.generate_private_key(ec.SECP256R1()))
        self.assertEqual(load({"jwt-public-key-file": path}, {}).jwt_public_key_file, path)
        with open(path, "wb") as f:
            f.write(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
        for cli in ({"jwt-public-key-file": path}, {"jwt-public-key-file": path + ".missing"}):
            with self.assertRaises(ConfigError) as caught:
                load(cli, {})
            self.assertIn("--jwt-public-key-file", str(caught.exception))


class ClaimTests(KeyFileCase):
    def setUp(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())

    def sign(self, **claims: Any) -> str:
        return jwt.encode({"sub": "u", "exp": NOW + 60, **claims}, self.private_key, algorithm="ES256")

    def test_issuer_and_audience(self) -> None:
        """When configured, iss must match and aud must hold one of the audiences; absent ones are refused."""
        tokens = self.tokens(self.private_key, issuer="https://idp.example/", audience=("synckit", "other"))
        self.assertEqual(tokens.identity(self.sign(iss="https://idp.example/", aud=["x", "synckit"])).user_id, "u")
        for token in (
            self.sign(iss="https://evil.example/", aud="synckit"),
            self.sign(iss="https://idp.example/", aud="someone-else"),
            self.sign(aud="synckit"),
            self.sign(iss="https://idp.example/"),
            jwt.encode({"userId": "u", "exp": NOW + 60}, SECRET, algorithm="HS256"),
        ):
            self.assertRaises(InvalidToken, tokens.identity, token)

    def test_time_claims_and_leeway(self) -> None:
        """Expired and not-yet-valid tokens are refused, against the injected clock, within the leeway."""
        strict = self.tokens(self.private_key)
        lenient = self.tokens(self.private_key, leeway=30)
        for token in (self.sign(exp=NOW - 10), self.sign(nbf=NOW + 10), self.sign(exp=NOW)):
            self.assertRaises(InvalidToken, strict.identity, token)
            lenient.identity(token)
        self.assertRaises(InvalidToken, lenient.identity, self.sign(exp=NOW - 31))
        self.assertRaises(InvalidToken, lenient.identity, self.sign(nbf=NOW + 31))

    def test_configurable_claims(self) -> None:
        """The user id and permissions come from the configured claims."""
        tokens = self.tokens(self.private_key, user_claims=("email",), permissions_claim="https://app.example/perms")
        token = self.sign(email="a@example.com", **{"https://app.example/perms": {"canWrite": ["w"]}})
        identity = tokens.identity(token)
        self.assertEqual(identity.user_id, "a@example.com")
        self.assertTrue(identity.permissions.writable("w"))
        self.assertEqual(identity.permissions_claim, {"canWrite": ["w"]})


class TokenTypeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.tokens = Tokens(SECRET, 3600, 7200, self.clock)

    def test_refresh_token_is_no_access_token(self) -> None:
        """A refresh token does not authenticate; an access token cannot be redeemed."""
        refresh = self.tokens.refresh_token("u", "e", {"isAdmin": True})
        access = self.tokens.access_token("u", "e", None)
        self.assertRaises(InvalidToken, self.tokens.identity, refresh)
        self.assertRaises(InvalidToken, self.tokens.redeem, access)
        self.assertEqual(self.tokens.identity(access).expires_at, NOW + 3600.0)

    def test_reference_tokens_still_authenticate(self) -> None:
        """A token shaped as the reference issues it (no typ) is an access token."""
        token = jwt.encode({"userId": "u", "email": "e", "permissions": {"canRead": ["d"]}, "iat": NOW, "exp": NOW + 5}, SECRET, algorithm="HS256")
        self.assertEqual(self.tokens.identity(token).user_id, "u")
        self.assertRaises(InvalidToken, self.tokens.redeem, token)

    def test_refresh_token_redeemed_once(self) -> None:
        """A refresh token is redeemed once, and no more after it expires."""
        refresh = self.tokens.refresh_token("u", "e", None)
        self.assertEqual(self.tokens.redeem(refresh)["userId"], "u")
        self.assertRaises(InvalidToken, self.tokens.redeem, refresh)
        self.clock.advance(7200)
        self.assertRaises(InvalidToken, self.tokens.redeem, refresh)

    def test_spent_tokens_are_forgotten_when_they_expire(self) -> None:
        """The spent set is bounded: full, it refuses (never forgets an unexpired one); expiry frees room."""
        spent = SpentTokens(capacity=2)
        self.assertTrue(spent.spend("a", 100, 0))
        self.assertFalse(spent.spend("a", 100, 1))
        self.assertTrue(spent.spend("b", 200, 1))
        self.assertFalse(spent.spend("c", 300, 2))
        self.assertTrue(spent.spend("c", 300, 100))
        self.assertFalse(spent.spend("b", 200, 100))


class FromConfigTests(KeyFileCase):
    def test_settings_reach_the_checks(self) -> None:
        """Tokens built from the settings use the key file, the issuer and the claim names."""
        private_key = ed25519.Ed25519PrivateKey.generate()
        config = load(
            {"jwt-public-key-file": self.key_file(private_key), "jwt-issuer": "idp", "jwt-user-claim": "uid"}, {}
        )
        clock = Clock()
        clock.advance(NOW)
        tokens = Tokens.from_config(config, clock)
        token = jwt.encode({"uid": "u7", "iss": "idp", "exp": NOW + 1}, private_key, algorithm="EdDSA")
        self.assertEqual(tokens.identity(token).user_id, "u7")
        self.assertRaises(InvalidToken, tokens.identity, jwt.encode({"uid": "u7", "exp": NOW + 1}, private_key, algorithm="EdDSA"))
        self.assertRaises(InvalidToken, tokens.identity, jwt.encode({"uid": "u", "iss": "idp"}, DEFAULT_JWT_SECRET, algorithm="HS256"))
