"""
Identities, JWTs and role-based access (docs/protocol.md, ``auth``; docs/security.md).

A token is verified with one of three kinds of key, and each key fixes its own algorithm:

- the shared secret (``jwt-secret``), for HS256/384/512: the reference's tokens, and the ones
  ``/auth/login`` issues when the demo login is on;
- a PEM public key file, whose type fixes the algorithm (RSA: RS256, EC: ES256/384/512 by curve,
  Ed25519/Ed448: EdDSA);
- an identity provider's JWKS, fetched with Twisted's HTTP client, each key's algorithm taken
  from its ``alg`` (or from ``kty``/``crv``), never from the token's header, so a token cannot
  choose to be checked as HS256 with a public key as its secret, or as ``alg: none``.

Expiry is checked against the injected clock rather than pyjwt's wall clock, so it is testable
without waiting; ``exp`` becomes L{Identity.expires_at} so a session can end when its token does.

Tokens carry a ``typ`` claim: ``access`` or ``refresh``.  A refresh token is never accepted where
an access token is expected (``auth``, ``/auth/me``, ``/auth/verify``), and is redeemed once: its
``jti`` is remembered, in this process, until it expires.  A token without ``typ`` (the
reference's, an identity provider's) is an access token.
"""

from __future__ import annotations

import heapq
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, cast

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from synckit.config import DEFAULT_JWT_SECRET, Config

_SHARED_SECRET_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
#: what a JWKS key may be used with; anything else there (``oct`` keys, ``none``) is skipped.
_PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

#: seconds that must pass between two JWKS fetches, however many unknown ``kid``s arrive
JWKS_MIN_INTERVAL = 30.0
#: seconds a JWKS fetch may take, answer included
JWKS_TIMEOUT = 10.0
#: the largest JWKS document read; identity providers publish a few kilobytes
JWKS_MAX_BYTES = 1024 * 1024
#: redeemed refresh tokens remembered at once; past this, refreshes are refused, not replayable
SPENT_CAPACITY = 100_000

ACCESS = "access"
REFRESH = "refresh"


@dataclass(frozen=True)
class Permissions:
    """
    Exact-match document lists; ``*`` grants every document; admin grants all (docs/protocol.md,
    ``auth``).
    """

    can_read: frozenset[str] = frozenset()
    can_write: frozenset[str] = frozenset()
    is_admin: bool = False

    @classmethod
    def from_claim(cls, claim: Any) -> "Permissions":
        """
        Permissions from a token's ``permissions`` claim.  A missing or malformed claim grants
        nothing: a valid token without the claim authenticates, and what it asks for gets
        "Permission denied", where the reference fails its first permission check with an
        internal error.
        """
        if not isinstance(claim, dict):
            return cls()

        def names(value: Any) -> frozenset[str]:
            return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else frozenset()

        return cls(names(claim.get("canRead")), names(claim.get("canWrite")), claim.get("isAdmin") is True)

    def readable(self, doc_id: str) -> bool:
        return self.is_admin or "*" in self.can_read or doc_id in self.can_read

    def writable(self, doc_id: str) -> bool:
        return self.is_admin or "*" in self.can_write or doc_id in self.can_write

    def to_claim(self) -> dict[str, Any]:
        return {"canRead": sorted(self.can_read), "canWrite": sorted(self.can_write), "isAdmin": self.is_admin}


EVERYONE = Permissions(frozenset({"*"}), frozenset({"*"}), False)
ADMIN = Permissions(is_admin=True)
#: as auth_success reports them; shared, as every anonymous connection has the same.
EVERYONE_CLAIM = EVERYONE.to_claim()
ADMIN_CLAIM = ADMIN.to_claim()


@dataclass(frozen=True)
class Identity:
    user_id: str
    permissions: Permissions
    #: what ``auth_success`` reports as permissions: the token's claim as sent, or ours.
    permissions_claim: Optional[Any] = field(default=None)
    #: when the token that proved this identity expires (seconds since the epoch), or C{None}
    #: for an identity that does not expire (API keys, anonymous, tokens without ``exp``).
    expires_at: Optional[float] = field(default=None)


class InvalidToken(Exception):
    """The token is malformed, wrongly signed, of the wrong type, expired or not yet valid."""


class UnknownKey(InvalidToken):
    """The token names a key this process does not have (yet): a JWKS fetch may bring it."""


@dataclass(frozen=True)
class VerifyingKey:
    """A key and the one algorithm it verifies."""

    key: Any
    algorithm: str
    #: the shared secret: the server's own tokens, which need no ``exp`` (as the reference's)
    shared: bool = False


def load_public_key(path: str) -> VerifyingKey:
    """
    A PEM public key file and the algorithm its type implies.

    @raise OSError: if the file cannot be read.
    @raise ValueError: if it is not a PEM public key of a supported type.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError("not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA key of {key.key_size} bits (2048 at least)")
        return VerifyingKey(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return VerifyingKey(key, _EC_ALGORITHMS[key.curve.name])
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return VerifyingKey(key, "EdDSA")
    raise ValueError("not an RSA, P-256/384/521 or Ed25519/Ed448 public key")


def parse_jwks(document: bytes) -> dict[Optional[str], VerifyingKey]:
    """
    The signing keys of a JWKS document by ``kid``, each with its pinned algorithm.  Keys that
    are not for signatures, not public, or of an unsupported type are left out, so that one odd
    key does not cost the others.

    @raise ValueError: if the document is not a JWKS at all.
    """
    try:
        value = orjson.loads(document)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    entries = value.get("keys") if isinstance(value, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no 'keys' list")
    keys: dict[Optional[str], VerifyingKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        if jwk.algorithm_name in _PUBLIC_KEY_ALGORITHMS:
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) else None] = VerifyingKey(jwk.key, jwk.algorithm_name)
    return keys


class _BoundedBody(Protocol):
    """Collects a response body, giving up once it passes C{limit} bytes."""

    def __init__(self, limit: int, done: Deferred) -> None:
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()  # type: ignore[attr-defined]
            if not self._done.called:
                self._done.errback(ValueError(f"larger than {self._limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._done.called:
            return
        if reason.check(ResponseDone):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


class JwksKeys:
    """
    An identity provider's keys, fetched from its JWKS URL when a token names a key not yet
    known (key rotation), at most once per L{JWKS_MIN_INTERVAL} so that tokens with made-up
    ``kid``s cannot turn the server into a fetch loop against the provider.  A failed fetch keeps
    the keys already known.
    """

    _log = Logger()

    def __init__(self, url: str, agent: IAgent, clock: IReactorTime, min_interval: float = JWKS_MIN_INTERVAL) -> None:
        self.url = url
        self._agent = agent
        self._clock = clock
        self._min_interval = min_interval
        self._keys: dict[Optional[str], VerifyingKey] = {}
        self._last_fetch: Optional[float] = None
        self._waiting: Optional[list[Deferred]] = None

    def key(self, kid: Optional[str]) -> Optional[VerifyingKey]:
        """The key named C{kid}; for a token without one, the provider's only key, if it has one."""
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def refresh(self) -> Deferred[None]:
        """
        Fetch the keys again, unless the last fetch began less than the minimum interval ago;
        callers arriving while a fetch is under way wait for that one.  Never fails.
        """
        waiter: Deferred[None] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        now = self._clock.seconds()
        if self._last_fetch is not None and now - self._last_fetch < self._min_interval:
            return succeed(None)
        self._last_fetch = now
        self._waiting = [waiter]
        fetch = Deferred.fromCoroutine(self._fetch())
        fetch.addTimeout(JWKS_TIMEOUT, self._clock)
        fetch.addErrback(self._failed)
        fetch.addCallback(self._wake)
        return waiter

    async def _fetch(self) -> None:
        response: IResponse = await self._agent.request(
            b"GET", self.url.encode("ascii"), Headers({b"Accept": [b"application/json"]})
        )
        body: Deferred[bytes] = Deferred()
        response.deliverBody(_BoundedBody(JWKS_MAX_BYTES, body))
        document = await body
        if response.code != 200:
            raise ValueError(f"HTTP status {response.code}")
        self._keys = parse_jwks(document)
        self._log.info("fetched {count} signing keys from {url}", count=len(self._keys), url=self.url)

    def _failed(self, failure: Failure) -> None:
        self._log.warn(
            "could not fetch the JWKS from {url}: {error}; keeping {count} known keys",
            url=self.url,
            error=failure.getErrorMessage() or failure.type.__name__,
            count=len(self._keys),
        )

    def _wake(self, _: None) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(None)


class SpentTokens:
    """
    The ``jti``s of redeemed refresh tokens, each kept until its token expires, so that a
    refresh token works once.  Bounded: when full of unexpired entries it refuses new ones, as
    forgetting one would let its token be replayed.  Per process: instances behind a load
    balancer do not share it.
    """

    _log = Logger()

    def __init__(self, capacity: int = SPENT_CAPACITY) -> None:
        self._capacity = capacity
        self._expiry: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []

    def spend(self, jti: str, expires_at: float, now: float) -> bool:
        """Record C{jti} as redeemed; C{False} if it already was, or if there is no room."""
        while self._by_expiry and self._by_expiry[0][0] <= now:
            self._expiry.pop(heapq.heappop(self._by_expiry)[1], None)
        if jti in self._expiry:
            return False
        if len(self._expiry) >= self._capacity:
            self._log.warn("refused a refresh: {count} unexpired refresh tokens already redeemed", count=len(self._expiry))
            return False
        self._expiry[jti] = expires_at
        heapq.heappush(self._by_expiry, (expires_at, jti))
        return True


class Tokens:
    """
    Issues the server's own JWTs (HS256 with the shared secret) and checks every token.

    @param public_key: a key from L{load_public_key}, for tokens without a ``kid`` (or with any,
        if there is no JWKS).
    @param jwks: an identity provider's keys, for tokens with a ``kid``.
    @param issuer: when set, the ``iss`` every token must carry.
    @param audience: when not empty, ``aud`` must hold one of these.
    @param leeway: seconds of clock skew allowed on ``exp`` and ``nbf``.
    @param user_claims: claims tried in order for the user id.
    @param permissions_claim: the claim holding ``{canRead, canWrite, isAdmin}``.
    """

    def __init__(
        self,
        secret: str,
        access_ttl: int,
        refresh_ttl: int,
        clock: IReactorTime,
        *,
        public_key: Optional[VerifyingKey] = None,
        jwks: Optional[JwksKeys] = None,
        issuer: Optional[str] = None,
        audience: Sequence[str] = (),
        leeway: int = 0,
        user_claims: Sequence[str] = ("userId", "sub"),
        permissions_claim: str = "permissions",
    ) -> None:
        self._secret = secret
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._clock = clock
        self._public_key = public_key
        self._jwks = jwks
        self._issuer = issuer
        self._audience = list(audience)
        self._leeway = leeway
        self._user_claims = tuple(user_claims)
        self._permissions_claim = permissions_claim
        # With an identity provider configured, the well-known development secret would let
        # anyone sign tokens; it is accepted only when nothing else is.
        self._secret_accepted = secret != DEFAULT_JWT_SECRET or (public_key is None and jwks is None)
        self._spent = SpentTokens()

    @classmethod
    def from_config(cls, config: Config, reactor: Any) -> "Tokens":
        """The tokens the settings describe; C{reactor} keeps time and fetches the JWKS."""
        public_key = load_public_key(config.jwt_public_key_file) if config.jwt_public_key_file else None
        jwks = JwksKeys(config.jwks_url, Agent(reactor), reactor) if config.jwks_url else None
        return cls(
            config.jwt_secret,
            config.jwt_expires_in,
            config.jwt_refresh_expires_in,
            reactor,
            public_key=public_key,
            jwks=jwks,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            leeway=config.jwt_leeway,
            user_claims=config.jwt_user_claim,
            permissions_claim=config.jwt_permissions_claim,
        )

    # Issuing

    def _issue(self, claims: dict[str, Any], ttl: int) -> str:
        now = int(self._clock.seconds())
        return jwt.encode({**claims, "iat": now, "exp": now + ttl}, self._secret, algorithm="HS256")

    def access_token(self, user_id: str, email: Optional[str], permissions: Any) -> str:
        claims: dict[str, Any] = {"userId": user_id, "email": email, "typ": ACCESS}
        if permissions is not None:
            claims["permissions"] = permissions
        return self._issue(claims, self._access_ttl)

    def refresh_token(self, user_id: str, email: Optional[str], permissions: Any) -> str:
        """
        A one-time refresh token.  It carries the permissions it was issued with, signed by us,
        so that a refresh grants what the login granted and nothing a caller sends.
        """
        claims = {"userId": user_id, "email": email, "permissions": permissions, "typ": REFRESH, "jti": secrets.token_urlsafe(16)}
        return self._issue(claims, self._refresh_ttl)

    # Checking

    def verify(self, token: Any) -> dict[str, Any]:
        """
        The claims of an access token that is valid now, checked with the keys already known.

        @raise InvalidToken: otherwise (L{UnknownKey} if a JWKS fetch might make it valid).
        """
        claims = self._decode(token)[0]
        if str(claims.get("typ", "")).lower() == REFRESH:
            raise InvalidToken("a refresh token is not an access token")
        return claims

    def verify_fetching(self, token: Any) -> Deferred[dict[str, Any]]:
        """L{verify}, fetching the JWKS first if the token names a key not yet known."""
        try:
            return succeed(self.verify(token))
        except UnknownKey:
            pass  # only a JWKS makes keys unknown rather than absent
        except InvalidToken as e:
            return fail(e)
        d = cast(JwksKeys, self._jwks).refresh()
        d.addCallback(lambda _: self.verify(token))
        return d

    def identity(self, token: Any) -> Identity:
        """
        The identity an access token proves, with the keys already known.

        @raise InvalidToken: if it proves none.
        """
        return self.identity_from(self.verify(token))

    def authenticate(self, token: Any) -> Deferred[Identity]:
        """
        L{identity}, fetching the JWKS first if the token names a key not yet known; fails with
        L{InvalidToken}.
        """
        return self.verify_fetching(token).addCallback(self.identity_from)

    def redeem(self, token: Any) -> dict[str, Any]:
        """
        The claims of a refresh token of ours that is valid now and not yet redeemed, which it
        now is.

        @raise InvalidToken: otherwise, an access token included.
        """
        claims, key = self._decode(token)
        jti, exp = claims.get("jti"), claims.get("exp")
        if not key.shared or claims.get("typ") != REFRESH or not isinstance(jti, str) or exp is None:
            raise InvalidToken("not a refresh token")
        if not self._spent.spend(jti, float(exp), self._clock.seconds()):
            raise InvalidToken("refresh token already used")
        return claims

    def identity_from(self, claims: dict[str, Any]) -> Identity:
        """The identity verified claims prove: the user from the user claims, the permissions claim."""
        user_id = next((claims[c] for c in self._user_claims if claims.get(c) is not None), None)
        permissions = claims.get(self._permissions_claim)
        exp = claims.get("exp")
        return Identity(
            str(user_id) if user_id is not None else "",
            Permissions.from_claim(permissions),
            permissions,
            float(exp) if exp is not None else None,
        )

    def _key(self, algorithm: Any, kid: Any) -> VerifyingKey:
        if algorithm in _SHARED_SECRET_ALGORITHMS:
            if not self._secret_accepted:
                raise InvalidToken("tokens signed with the development secret are not accepted")
            return VerifyingKey(self._secret, algorithm, shared=True)
        if self._jwks is not None and (kid is not None or self._public_key is None):
            key = self._jwks.key(kid if isinstance(kid, str) else None)
            if key is None:
                raise UnknownKey(f"no key {kid!r} in {self._jwks.url}")
            return key
        if self._public_key is not None:
            return self._public_key
        raise InvalidToken(f"no key for algorithm {algorithm!r}")

    def _decode(self, token: Any) -> tuple[dict[str, Any], VerifyingKey]:
        if not isinstance(token, str):
            raise InvalidToken("token is not a string")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        key = self._key(header.get("alg"), header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key.key,
                # the key's one algorithm: the header only picks the key, never how it is used
                algorithms=[key.algorithm],
                audience=self._audience or None,
                issuer=self._issuer,
                # exp and nbf are checked below, against our clock; no type checks on sub or jti,
                # which identity providers vary.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(self._audience),
                    "verify_iss": self._issuer is not None,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        self._check_times(claims, required_exp=not key.shared)
        return claims, key

    def _check_times(self, claims: dict[str, Any], required_exp: bool) -> None:
        """
        ``exp`` and ``nbf`` against our clock, with the leeway.  An identity provider's token
        must expire; one signed with the shared secret need not, as in the reference.
        """
        now = self._clock.seconds()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if exp is None and required_exp:
            raise InvalidToken("token has no exp")
        if exp is not None and (not _is_number(exp) or now >= exp + self._leeway):
            raise InvalidToken("token expired")
        if nbf is not None and (not _is_number(nbf) or now + self._leeway < nbf):
            raise InvalidToken("token not yet valid")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
