"""Users, roles and API tokens: a token is shown once and stored only as its SHA-256 hash; every
API endpoint needs one, and operator endpoints need the operator role."""

from __future__ import annotations

import hashlib
import re
import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from backfill.errors import BackfillError
from backfill.server.db import ServerDB, User

ROLES = ("user", "operator")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_bearer = HTTPBearer(auto_error=False, description="An API token from `backfill users add`.")


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "bf_" + secrets.token_urlsafe(32)


def check_name(name: str, what: str = "user") -> str:
    if not _NAME.match(name):
        raise BackfillError(
            f"The {what} name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return name


def add_user(db: ServerDB, name: str, role: str) -> tuple[User, str]:
    """Create a user; returns it with its token, which is not stored and cannot be shown again."""
    check_name(name)
    if role not in ROLES:
        raise BackfillError(f"The role {role!r} is unknown; use 'user' or 'operator'.")
    if db.get_user(name) is not None:
        raise BackfillError(f"The user {name} exists already; pick another name or rotate their token.")
    token = new_token()
    return db.add_user(name, role, hash_token(token), secrets.token_hex(32)), token


def rotate_token(db: ServerDB, name: str) -> str:
    if db.get_user(name) is None:
        raise BackfillError(f"There is no user {name}; `backfill users list` shows them.")
    token = new_token()
    db.update_user(name, token_hash=hash_token(token))
    return token


async def current_user(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> User:
    """The user whose token came with the request, or 401."""
    user = None
    if creds is not None and creds.scheme.lower() == "bearer":
        user = request.app.state.db.user_by_token_hash(hash_token(creds.credentials))
    if user is None:
        raise HTTPException(401, "A valid API token is required: send 'Authorization: Bearer TOKEN'.", headers={"WWW-Authenticate": "Bearer"})
    request.state.user = user.name
    return user


async def operator(user: User = Depends(current_user)) -> User:
    """The current user if an operator, else 403."""
    if not user.is_operator:
        raise HTTPException(403, "This needs an operator's token.")
    return user
