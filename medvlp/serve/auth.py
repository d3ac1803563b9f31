"""API keys: ``Authorization: Bearer KEY``, compared in constant time, never logged.

Keys come from the environment variable ``MEDVLP_API_KEYS`` (comma-separated) and/or a keys file (one key per line,
``#`` comments and blank lines ignored). A server with no key refuses to start unless it is told ``--no-auth``, and
``--no-auth`` binds to the loopback interface only (see :func:`check_auth_config`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from medvlp.serve.errors import ApiError

__all__ = ["ENV_VAR", "KeyRing", "check_auth_config", "is_loopback", "load_keys"]

ENV_VAR = "MEDVLP_API_KEYS"
MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    # comparing fixed-length digests hides the length of the configured keys as well as their content
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The accepted keys, held as SHA-256 digests.

    Args:
        keys: the accepted keys; an empty ring accepts every request (the ``--no-auth`` mode).
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys: every key is compared with :func:`hmac.compare_digest`
        (no early exit), so the time taken does not depend on which key matched or how much of it did."""
        if not self._digests:
            return True
        candidate = _digest(presented or "")
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(candidate, d)
        return ok and bool(presented)

    def require(self, request: Request) -> None:
        """FastAPI dependency: 401 unless the request carries a valid ``Authorization: Bearer KEY``."""
        if not self._digests:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.check(token.strip()):
            raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def load_keys(keys_file: Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """The keys from ``MEDVLP_API_KEYS`` and ``keys_file``.

    Raises:
        ValueError: an unreadable keys file or a key shorter than 16 characters (the message never shows a key).
    """
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(ENV_VAR, "").split(",") if k.strip()]
    if keys_file is not None:
        try:
            text = Path(keys_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the API keys file {keys_file}: {type(exc).__name__}") from exc
        keys += [s for line in text.splitlines() if (s := line.split("#", 1)[0].strip())]
    short = sum(len(k) < MIN_KEY_LENGTH for k in keys)
    if short:
        raise ValueError(
            f"{short} API key(s) shorter than {MIN_KEY_LENGTH} characters; use long random keys "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return keys


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_config(keys: list[str], no_auth: bool, host: str) -> None:
    """The rule for running without keys.

    Raises:
        ValueError: no key and no ``--no-auth``; or ``--no-auth`` on a non-loopback host; or keys and ``--no-auth``.
    """
    if no_auth and keys:
        raise ValueError(f"--no-auth was given but API keys are configured ({ENV_VAR} or --api-keys-file); pick one")
    if no_auth and not is_loopback(host):
        raise ValueError(f"--no-auth serves without keys and is only allowed on the loopback interface, not {host!r}")
    if not no_auth and not keys:
        raise ValueError(
            f"no API key configured: set {ENV_VAR}=key1,key2 or give --api-keys-file FILE "
            "(or --no-auth to serve without keys on 127.0.0.1 only)"
        )
