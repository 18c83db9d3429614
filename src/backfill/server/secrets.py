"""Provider keys at rest: Fernet-encrypted with the operator's secret key (BACKFILL_SECRET_KEY or
--secret-key-file); several keys, newest first, let `backfill credentials rotate-key` re-encrypt."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from backfill.errors import BackfillError

SECRET_ENV = "BACKFILL_SECRET_KEY"
_SPLIT = re.compile(r"[\s,]+")


def new_key() -> str:
    return Fernet.generate_key().decode()


def read_keys(key_file: Path | None = None) -> list[str]:
    """The secret keys, newest first: from `key_file` if given, else from $BACKFILL_SECRET_KEY (either may list
    several, separated by commas or newlines). Empty when neither is set."""
    if key_file is not None:
        try:
            text = key_file.read_text()
        except OSError as e:
            raise BackfillError(f"The secret key file {key_file} cannot be read ({e.strerror}); check the path.") from None
    else:
        text = os.environ.get(SECRET_ENV, "")
    return [k for k in _SPLIT.split(text.strip()) if k]


class SecretBox:
    """Encrypts with the first key; decrypts with any of them."""

    def __init__(self, keys: list[str]):
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError):
            raise BackfillError(
                f"The secret key is not a Fernet key; make one with `backfill credentials new-key` and set {SECRET_ENV}."
            ) from None

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise BackfillError(
                "A stored provider key cannot be decrypted with the secret key given; start the server with the key"
                " it was stored under (list the old one after the new one to rotate)."
            ) from None

    def rotate(self, token: str) -> str:
        """The same secret encrypted under the first key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise BackfillError(
                "A stored provider key was encrypted under none of the keys given; list the old key after the new one."
            ) from None


def open_box(keys: list[str]) -> SecretBox | None:
    return SecretBox(keys) if keys else None
