"""Daemon addresses: the one parser that the client, ``kvstore status``, ``kvstore serve``
and the config file share, so a malformed address fails at once, the same way everywhere.

    ipc:///ABSOLUTE/PATH/kvstore.sock      a Unix socket on this node (the default)
    tcp://HOST:PORT                        HOST a name, an IPv4 address or [IPv6]; PORT 1..65535

zmq itself accepts some malformed forms and then waits forever for a peer that can
never answer (``tcp://127.0.0.1`` without a port, ``ipc://``), hence the checks here.
Anything that is neither form is refused with the forms expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controller.config import ConfigError

FORMS = "ipc:///ABSOLUTE/PATH (a Unix socket on this node) or tcp://HOST:PORT"
MAX_IPC_PATH_BYTES = 107
"""sun_path holds 108 bytes with its NUL; zmq refuses longer ipc paths."""
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+")


class AddressError(ConfigError):
    """A daemon address that is not ipc:///PATH or tcp://HOST:PORT."""


@dataclass(frozen=True)
class DaemonAddress:
    """A checked address; ``url`` is what zmq connects to or binds."""

    url: str
    scheme: str
    """"ipc" or "tcp"."""
    path: str | None = None
    """The socket file (ipc)."""
    host: str | None = None
    """The host name or address, IPv6 in brackets (tcp)."""
    port: int | None = None

    @property
    def is_tcp(self) -> bool:
        return self.scheme == "tcp"


def parse_address(text: object) -> DaemonAddress:
    """``text`` as a DaemonAddress; AddressError naming what is wrong and the forms expected."""
    if not isinstance(text, str):
        raise AddressError(f"a daemon address must be a string, got {type(text).__name__}; "
                           f"expected {FORMS}")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("ipc", "tcp"):
        raise _bad(text, "unknown form")
    if scheme == "ipc":
        return _parse_ipc(text, rest)
    return _parse_tcp(text, rest)


def _bad(text: str, what: str) -> AddressError:
    return AddressError(f"daemon address {text!r}: {what}; expected {FORMS}")


def _parse_ipc(text: str, path: str) -> DaemonAddress:
    if not path.startswith("/"):
        raise _bad(text, "the socket path must be absolute (ipc:// and then /PATH: three slashes)")
    if path.endswith("/") or "\0" in path:
        raise _bad(text, "it names a directory, not a socket file")
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        raise _bad(text, f"the socket path is {len(path.encode())} bytes, Unix sockets allow "
                   f"{MAX_IPC_PATH_BYTES}")
    return DaemonAddress(text, "ipc", path=path)


def _parse_tcp(text: str, rest: str) -> DaemonAddress:
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or (host.count(":") and not host.startswith("[")):
        raise _bad(text, "it needs a host and a port (an IPv6 host in brackets: tcp://[::1]:7600)")
    if not _HOST.fullmatch(host):
        raise _bad(text, f"{host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(text, f"the port {port_text!r} must be a number in 1..65535")
    return DaemonAddress(text, "tcp", host=host, port=int(port_text))
