"""The dashboard's secrets and how they stay secret: the API token, browser sessions, CSRF tokens, redaction.

- The API token comes from KAT_API_TOKEN, else `$KAT_HOME/api_token` (mode 0600); `kat serve` generates
  that file on first start and prints the token once to its terminal (never to a log).
- A browser signs in by posting the token once; its session cookie holds HMAC(token, "session"), not the
  token, so a stolen cookie does not reveal the token and changing the token ends every session.
- Forms carry a CSRF token, HMAC(token, "csrf:" + session): a page of another site can neither read nor
  forge it. The cookie is also SameSite=Strict and HttpOnly.
- `redact_text` and `redact_config` take secrets out of what pages and API answers show: log tails and
  configs (keys named like key/token/secret/password, and the values of such environment variables).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Any

from kat_core.util import atomic_write

TOKEN_ENV = "KAT_API_TOKEN"
TOKEN_FILE = "api_token"
SESSION_COOKIE = "kat_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MASK = "***"

# a name is a secret's when it ends in one of these words ("max_new_tokens" and "mode_token_weight" are not)
_SECRET_WORDS = (r"(?:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|passw(?:or)?d|token|cookie|credentials?"
                 r"|private[_-]?key)")
_SECRET_NAME = re.compile(rf"(?:^|[_.-]){_SECRET_WORDS}$", re.I)
# key=value / key: value / "key": "value" where the key names a secret
_SECRET_ASSIGN = re.compile(
    rf"""(?P<key>\b[\w.-]*{_SECRET_WORDS}["']?\s*[=:]\s*)(?P<q>["']?)(?P<value>[^\s"',;]{{4,}})""", re.I)
_BEARER = re.compile(r"(?i)(bearer\s+)[\w.~+/=-]{8,}")
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")


def load_token(home: Path, *, create: bool = True) -> tuple[str | None, bool]:
    """(token, created): KAT_API_TOKEN, else the token file, else (with `create`) a new random token
    written to the file readable by its owner only. A token file others can read is refused."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, False
    path = Path(home) / TOKEN_FILE
    if path.is_file():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            from kat_core.errors import KatError

            raise KatError(f"{path} is readable by others (mode {mode:o}); chmod 600 it or set {TOKEN_ENV}")
        token = path.read_text().strip()
        if token:
            return token, False
    if not create:
        return None, False
    token = secrets.token_urlsafe(32)
    atomic_write(path, token + "\n", mode=0o600)
    return token, True


def _mac(token: str, message: str) -> str:
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def session_value(token: str) -> str:
    return _mac(token, "kat-dashboard-session")


def csrf_token(token: str, session: str) -> str:
    return _mac(token, f"csrf:{session}")[:40]


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_config(value: Any, key: str = "") -> Any:
    """A copy of a config (nested dicts/lists) with the values of secret-named keys masked."""
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_config(v, key) for v in value]
    if key and secret_name(key) and value not in (None, ""):
        return MASK
    return value


def redact_overrides(overrides: list[str]) -> list[str]:
    """`key=value` overrides with the values of secret keys (synth.openai.api_key=...) masked."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{key}={MASK}" if sep and value and secret_name(key.rsplit(".", 1)[-1]) else item)
    return out


def _secret_values(extra: tuple[str, ...]) -> list[str]:
    values = [v for k, v in os.environ.items() if secret_name(k) and len(v) >= 6]
    values += [v for v in extra if v and len(v) >= 6]
    return sorted(set(values), key=len, reverse=True)


def redact_text(text: str, extra: tuple[str, ...] = ()) -> str:
    """`text` with secrets masked: the values of secret-named environment variables (and `extra`), then
    anything shaped like `token=...`, `password: ...`, `Bearer ...` or a password in a URL."""
    for value in _secret_values(extra):
        text = text.replace(value, MASK)
    text = _SECRET_ASSIGN.sub(lambda m: f"{m['key']}{m['q']}{MASK}", text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)
