"""API keys of ``hiermem serve`` and the tenants they stand for.

Each key is one tenant: its sessions live in their own namespace (in memory and in a folder of
the session directory) named by a hash of the key, so the key itself is never written to disk and
no tenant can list, read, continue or delete another's sessions.

Keys file (``--api-keys-file``): one key per line, optionally preceded by a name for the logs::

    # comments and blank lines are ignored
    alice   sk-0c6f0e1b9d5a4e27a8d3c1f2b7e94a60
    sk-5b2e8f1c7d9a4b63a0e4d2c8f1b7a936      # (a key alone is named key-<hash prefix>)

Keys are 8-256 printable ASCII characters without spaces (what an ``Authorization: Bearer`` header
carries); use long random ones (``python -c "import secrets; print('sk-' + secrets.token_hex(16))"``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from hiermem.errors import ConfigError

log = logging.getLogger(__name__)

KEY = re.compile(r"[\x21-\x7e]{8,256}")
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def namespace_of(key: str) -> str:
    """The folder name of a key's sessions: a domain-separated SHA-256 of the key (hex prefix)."""
    return hashlib.sha256(b"hiermem-tenant\0" + key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Tenant:
    """Who a request comes from: ``name`` for logs, ``namespace`` for its sessions."""

    name: str
    namespace: str
    digest: bytes = field(default=b"", repr=False)  # SHA-256 of the key, compared in constant time


PUBLIC = Tenant("public", "public")  # every request when the server has no keys


class AuthError(Exception):
    """No key, or a wrong one (answered 401)."""


class KeyRing:
    """The accepted keys. ``authenticate`` maps an ``Authorization`` header to its tenant."""

    def __init__(self, keys: dict[str, str] | None = None):
        self.tenants: list[Tenant] = []
        seen: set[str] = set()
        for name, key in (keys or {}).items():
            if not KEY.fullmatch(key):
                raise ConfigError(f"the API key named {name!r} must be 8-256 printable ASCII characters without "
                                  "spaces")
            if key in seen:
                raise ConfigError(f"the API key named {name!r} is listed twice")
            seen.add(key)
            self.tenants.append(Tenant(name, namespace_of(key), hashlib.sha256(key.encode()).digest()))

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    @classmethod
    def load(cls, api_key: str | None = None, api_keys_file: str | Path | None = None) -> KeyRing:
        """Keys from ``api_key`` (named "default") and from a keys file (see the module docstring)."""
        keys = {"default": api_key} if api_key else {}
        if api_keys_file:
            for name, key in read_keys_file(api_keys_file).items():
                if name in keys:
                    raise ConfigError(f"{api_keys_file}: the name {name!r} is used twice")
                keys[name] = key
        return cls(keys)

    def authenticate(self, header: str | None) -> Tenant:
        """The tenant of ``Authorization: Bearer <key>``; AuthError when missing or unknown."""
        if not self.enabled:
            return PUBLIC
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = None
        for tenant in self.tenants:  # every key is compared, so timing does not tell which matched
            if hmac.compare_digest(digest, tenant.digest):
                found = tenant
        if found is None:
            raise AuthError("incorrect API key provided")
        return found


def read_keys_file(path: str | Path) -> dict[str, str]:
    """name -> key from a keys file; errors name the line (never the key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"API keys file not found: {path}")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", path)
    keys: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ConfigError(f"{path}:{n}: expected 'KEY' or 'NAME KEY', got {len(words)} words")
        key = words[-1]
        if not KEY.fullmatch(key):
            raise ConfigError(f"{path}:{n}: a key must be 8-256 printable ASCII characters without spaces")
        name = words[0] if len(words) == 2 else f"key-{namespace_of(key)[:8]}"
        if not NAME.fullmatch(name):
            raise ConfigError(f"{path}:{n}: a name is 1-64 characters from letters, digits and '_.@-'")
        if name in keys:
            raise ConfigError(f"{path}:{n}: the name {name!r} is used twice")
        keys[name] = key
    if not keys:
        raise ConfigError(f"{path} holds no API keys")
    return keys


__all__ = ["PUBLIC", "AuthError", "KeyRing", "Tenant", "namespace_of", "read_keys_file"]
