"""The web config file (Prometheus exporter-toolkit format): TLS and basic auth of /metrics.

Read by the same loader as the configuration file, so it has the same limits (size,
values once aliases are expanded, depth) and errors (``FILE:LINE: key.path: message``,
all of them at once), against a schema of its own (``web_config_schema.json``).
Loading the certificate and key is the web server's part (`web.server`).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virt_trimd.config.load import DocumentLoader, UnreadableDocument, read_document
from virt_trimd.config.schema import KeyPath, Schema

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS: KeyPath = ("tls_server_config",)
_USERS: KeyPath = ("basic_auth_users",)


class WebConfigError(Exception):
    """The web config file is unreadable or invalid; the message names file, line and key."""


@dataclass(frozen=True)
class TLSServerConfig:
    """tls_server_config of a web config file, paths already made absolute."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None


@dataclass(frozen=True)
class WebConfig:
    """A validated web config; an empty file gives plain HTTP without authentication."""

    path: Path | None = None
    tls: TLSServerConfig | None = None
    # repr=False: bcrypt hashes must not end up in logs through a repr.
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict, repr=False)


def read_web_config(path: Path) -> WebConfig:
    """Read and validate the web config file at ``path``; raise WebConfigError.

    The message lists every problem, one ``FILE:LINE: key.path: message`` per line.
    Files named in it must exist; their contents are not read here.
    """
    path = Path(path)
    try:
        data = read_document(path, "web config file")
    except UnreadableDocument as exc:
        raise WebConfigError(str(exc)) from None
    loader = _WebLoader(path, Schema.named("web_config_schema.json"))
    config = loader.run(data)
    if config is None:
        raise WebConfigError("\n".join(loader.formatted()))
    return config


class _WebLoader(DocumentLoader):
    """Schema-checked document -> cross-checks the schema cannot express -> WebConfig."""

    source: Path

    def run(self, data: bytes) -> WebConfig | None:
        document = self.read(data)
        if document is None:
            return None
        self._unsupported(document, ())
        tls = None
        if isinstance(document.get("tls_server_config"), dict):
            self._unsupported(document["tls_server_config"], _TLS)
            if not self._under(_TLS, self.invalid):
                tls = self._tls(document)
        users = self._users(document)
        if self.problems:
            return None
        return WebConfig(path=self.source, tls=tls, basic_auth_users=users)

    def _unsupported(self, mapping: dict[str, Any], path: KeyPath) -> None:
        for key in mapping:
            if self.schema.at(path).get("properties", {}).get(key, {}).get("x-unsupported"):
                self.problem(
                    (*path, key), "exporter-toolkit option not supported by virt-trimd; remove it"
                )

    def _tls(self, document: dict[str, Any]) -> TLSServerConfig | None:
        cert_file = self._file((*_TLS, "cert_file"), document)
        key_file = self._file((*_TLS, "key_file"), document)
        auth_type = self._value((*_TLS, "client_auth_type"), document) or "NoClientCert"
        ca_file = self._file((*_TLS, "client_ca_file"), document)
        raw_ca = document["tls_server_config"].get("client_ca_file")
        if raw_ca and auth_type == "NoClientCert":
            # exporter-toolkit refuses this too: a CA without a policy checks nothing.
            self.problem(
                (*_TLS, "client_ca_file"),
                "set client_auth_type (e.g. RequireAndVerifyClientCert) to use client CAs",
            )
        elif not raw_ca and auth_type != "NoClientCert":
            self.problem((*_TLS, "client_ca_file"), f"required by {auth_type}")
        min_name = self._value((*_TLS, "min_version"), document) or "TLS12"
        max_name = self._value((*_TLS, "max_version"), document)
        min_version = _TLS_VERSIONS.get(min_name)
        max_version = _TLS_VERSIONS.get(max_name) if max_name else None
        if min_version and max_version and max_version < min_version:
            self.problem((*_TLS, "max_version"), "is lower than min_version")
        if cert_file is None or key_file is None or min_version is None:
            return None
        return TLSServerConfig(
            cert_file=cert_file,
            key_file=key_file,
            client_auth_type=str(auth_type),
            client_ca_file=ca_file,
            min_version=min_version,
            max_version=max_version,
        )

    def _file(self, path: KeyPath, document: dict[str, Any]) -> Path | None:
        value = self._value(path, document)
        if value is None:
            return None
        assert isinstance(value, Path)
        if not value.is_file():
            self.problem(path, f"file not found: {value}")
            return None
        return value

    def _users(self, document: dict[str, Any]) -> dict[str, bytes]:
        users = document.get("basic_auth_users")
        if not isinstance(users, dict) or self._under(_USERS, self.invalid):
            return {}
        out: dict[str, bytes] = {}
        for user, hashed in users.items():
            if not user:
                self.problem(_USERS, "user names must not be empty")
            elif isinstance(hashed, str) and not self._under((*_USERS, user), self.invalid):
                out[user] = hashed.encode("ascii")
        if out:
            try:
                import bcrypt  # noqa: PLC0415, F401  (only needed with basic auth)
            except ImportError:
                self.problem(
                    _USERS, "needs the Python bcrypt module (pip install 'virt-trimd[web]')"
                )
        return out
