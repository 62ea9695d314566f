"""Admin API authentication: bearer tokens with two roles, compared in constant time.

Tokens come from the environment (``SUBSYS_ADMIN_TOKEN``: operator,
``SUBSYS_ADMIN_READ_TOKEN``: read) or the config's ``[secrets]``, never
argv, and are never logged: audit lines name a token by its *id* (role and
the first characters of its SHA-256). Without any token the admin API
refuses every request (401, saying how to configure one) unless the node
was started with the explicit insecure-dev switch (``node.admin_insecure``),
which ``subsys dev`` may use and which the node announces at start.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from subsys.config import Settings

__all__ = ["Principal", "Authenticator", "AuthFailure"]


@dataclass(frozen=True, slots=True)
class Principal:
    role: str  # read | operator
    token_id: str

    @property
    def can_operate(self) -> bool:
        return self.role == "operator"


class AuthFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def token_id(role: str, token: str) -> str:
    return f"{role}:{hashlib.sha256(token.encode()).hexdigest()[:8]}"


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._tokens = [
            (token.encode(), Principal(role, token_id(role, token)))
            for role, token in (("operator", settings.admin_token), ("read", settings.admin_read_token))
            if token
        ]
        self.insecure = settings.node.admin_insecure

    @property
    def configured(self) -> bool:
        return bool(self._tokens) or self.insecure

    def authenticate(self, request: web.Request) -> Principal:
        if self.insecure:
            return Principal("operator", "insecure-dev")
        if not self._tokens:
            raise AuthFailure(
                401,
                "admin_disabled",
                "no admin token is configured on this node: set SUBSYS_ADMIN_TOKEN (operator role) and/or "
                "SUBSYS_ADMIN_READ_TOKEN (read role) in its environment, or [secrets] admin_token / "
                "admin_read_token in its config file",
            )
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AuthFailure(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        candidate = presented.strip().encode()
        found: Principal | None = None
        for token, principal in self._tokens:  # compare against every token: timing says nothing
            if hmac.compare_digest(candidate, token):
                found = principal
        if found is None:
            raise AuthFailure(401, "unauthorized", "wrong token")
        return found
