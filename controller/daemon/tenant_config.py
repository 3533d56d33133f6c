"""Who the tenants are: tokens that name one, uids admitted, quotas (``[tenants]``, ``allow_users``).

A tenant is named by the daemon, from what the kernel or a secret proves, never from
what a client says about itself:

- a client presenting a tenant's token (``[tenants.NAME] token_file``) is tenant NAME
  (on tcp, and on ipc too);
- a client whose CURVE key (tcp with ``auth.curve_*``) is a tenant's
  ``curve_public_key`` (z85, as in the key file) is that tenant; another admitted key is
  tenant ``curve:<its first 16 characters>``;
- otherwise, on ipc, it is ``uid:N``: N is the uid the kernel reports for its side
  socket connection (SO_PEERCRED). Processes of one user are one tenant: they can
  read each other's memory anyway (ptrace, /proc), so the daemon cannot tell them
  apart, and does not try;
- otherwise, on tcp, the clients of the shared ``auth`` token are tenant ``default``.

``[tenants."*"]`` gives the quotas of tenants not listed.
"""

from __future__ import annotations

import hmac
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from controller.config import ConfigError
from controller.daemon.pools import TenantQuota

_KEYS = {"token_file", "token", "curve_public_key", "l2_pages", "l3_bytes"}
MAX_TENANT_NAME = 64


@dataclass(frozen=True)
class TenantSettings:
    quotas: dict[str, TenantQuota]
    default_quota: TenantQuota
    tokens: tuple[tuple[bytes, str], ...]
    allowed_uids: frozenset[int]
    curve_keys: dict[str, str]
    """z85 public key -> tenant."""

    def tenant_of_curve_key(self, z85_key: str) -> str:
        """The tenant of a client that completed the CURVE handshake with this key."""
        return self.curve_keys.get(z85_key) or f"curve:{z85_key[:16]}"

    def tenant_of_token(self, offered: bytes) -> str | None:
        """The tenant whose token this is (every token compared, in constant time)."""
        found = None
        for token, name in self.tokens:
            if offered and hmac.compare_digest(offered, token):
                found = name
        return found


def parse_tenants(table: Mapping[str, Any], allow_users: str | None) -> TenantSettings:
    """Checked settings of ``DaemonConfig.tenants`` and ``allow_users``; ConfigError names
    the entry at fault."""
    quotas, tokens, default, curve_keys = {}, [], TenantQuota(), {}
    for name, entry in dict(table).items():
        where = f"tenants.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a table (token_file, l2_pages, l3_bytes)")
        unknown = set(entry) - _KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
        if not name or len(name) > MAX_TENANT_NAME or not name.isprintable():
            raise ConfigError(f"{where}: a tenant name is 1..{MAX_TENANT_NAME} printable characters")
        quota = TenantQuota(_count(entry, "l2_pages", where), _count(entry, "l3_bytes", where))
        if name == "*":
            default = quota
            continue
        quotas[name] = quota
        token = _token(entry, where)
        if token is not None:
            tokens.append((token, name))
        key = entry.get("curve_public_key")
        if key is not None:
            if type(key) is not str or len(key) != 40:
                raise ConfigError(f"{where}.curve_public_key must be a z85 public key (40 "
                                  "characters, the public-key line of a zmq.auth key file)")
            if key in curve_keys:
                raise ConfigError(f"{where}: two tenants share a CURVE key")
            curve_keys[key] = name
    if len({t for t, _ in tokens}) != len(tokens):
        raise ConfigError("two tenants share a token: each tenant needs its own")
    return TenantSettings(quotas, default, tuple(tokens), frozenset({os.getuid(), *_uids(allow_users)}),
                          curve_keys)


def _count(entry: Mapping, key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{where}.{key} must be a positive integer, got {value!r}")
    return value


def _token(entry: Mapping, where: str) -> bytes | None:
    if "token" in entry:
        token = str(entry["token"]).encode().strip()
    elif "token_file" in entry:
        try:
            token = Path(entry["token_file"]).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.token_file: {exc}") from None
    else:
        return None
    if len(token) < 16:
        raise ConfigError(f"{where}: a tenant token must be at least 16 characters (it is all "
                          "that names the tenant)")
    return token


def _uids(allow_users: str | None) -> list[int]:
    uids = []
    for item in (allow_users or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item.isdigit():
            uids.append(int(item))
            continue
        try:
            uids.append(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise ConfigError(f"allow_users: no user named {item!r} on this host") from None
    return uids
