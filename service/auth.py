"""Optional API keys: with keys configured, every route but the health probes (and, unless its
own setting says otherwise, ``/metrics``; the API's description under ``/docs``; and the page at
``/``, which asks for a key itself) needs
``Authorization: Bearer <key>``. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
from pathlib import Path

from service.config import Settings

OPEN_PATHS = ("/health/", "/v2/health/", "/docs", "/redoc", "/openapi.json")


class ApiKeys:
    def __init__(self, keys: list[str], metrics_open: bool = True) -> None:
        if not keys:
            raise ValueError("ApiKeys needs at least one key")
        self._keys = [k.encode() for k in keys]
        self.metrics_open = metrics_open

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """The configured keys (the setting's comma-separated list and the key file's lines),
        or None when there are none: then every route is open."""
        keys = [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
        if settings.api_keys_file is not None:
            keys += [line.strip() for line in read_key_file(settings.api_keys_file)]
        keys = [k for k in keys if k]
        return cls(keys, metrics_open=not settings.metrics_require_key) if keys else None

    def is_open(self, path: str) -> bool:
        return (path == "/" or path.startswith(OPEN_PATHS)
                or (self.metrics_open and path == "/metrics"))

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys."""
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        found = False
        for key in self._keys:  # every key is compared: the time does not tell which matched
            found |= hmac.compare_digest(token, key)
        return found


def read_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    return [line for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
