"""
Identities, JWTs and role-based access (PROTOCOL.md section 5).

Tokens are HS256 JWTs with the reference's claims (``userId``, ``email``, ``permissions``,
``iat``/``exp`` in seconds).  Expiry is checked against the injected clock rather than pyjwt's
wall clock, so expiry is testable without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import jwt
from twisted.internet.interfaces import IReactorTime

_ACCEPTED_ALGORITHMS = ["HS256", "HS384", "HS512"]


@dataclass(frozen=True)
class Permissions:
    """Exact-match document lists; ``*`` grants every document; admin grants all (section 5.4)."""

    can_read: frozenset[str] = frozenset()
    can_write: frozenset[str] = frozenset()
    is_admin: bool = False

    @classmethod
    def from_claim(cls, claim: Any) -> "Permissions":
        """
        Permissions from a token's ``permissions`` claim.  A missing or malformed claim grants
        nothing (PROTOCOL.md R-7) instead of failing on first use as the reference does.
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


class InvalidToken(Exception):
    """The token is malformed, wrongly signed, expired or not yet valid."""


class Tokens:
    """Issues and checks the server's JWTs."""

    def __init__(self, secret: str, access_ttl: int, refresh_ttl: int, clock: IReactorTime) -> None:
        self._secret = secret
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._clock = clock

    def _issue(self, claims: dict[str, Any], ttl: int) -> str:
        now = int(self._clock.seconds())
        return jwt.encode({**claims, "iat": now, "exp": now + ttl}, self._secret, algorithm="HS256")

    def access_token(self, user_id: str, email: Optional[str], permissions: Any) -> str:
        claims: dict[str, Any] = {"userId": user_id, "email": email}
        if permissions is not None:
            claims["permissions"] = permissions
        return self._issue(claims, self._access_ttl)

    def refresh_token(self, user_id: str) -> str:
        return self._issue({"userId": user_id}, self._refresh_ttl)

    def verify(self, token: Any) -> dict[str, Any]:
        """
        The token's claims if it is valid now.

        @raise InvalidToken: otherwise.
        """
        if not isinstance(token, str):
            raise InvalidToken("token is not a string")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=_ACCEPTED_ALGORITHMS,
                # Claims are checked as jsonwebtoken checks them: exp and nbf below, against our
                # clock; no type checks on sub or jti, which identity providers vary.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        now = self._clock.seconds()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if exp is not None and (not isinstance(exp, (int, float)) or now >= exp):
            raise InvalidToken("token expired")
        if nbf is not None and (not isinstance(nbf, (int, float)) or now < nbf):
            raise InvalidToken("token not yet valid")
        return claims

    def identity(self, token: Any) -> Identity:
        claims = self.verify(token)
        user_id = claims.get("userId")
        return Identity(
            str(user_id) if user_id is not None else "",
            Permissions.from_claim(claims.get("permissions")),
            claims.get("permissions"),
        )
