"""Who the daemon serves: socket permissions on ipc://, a shared token or CURVE on tcp://.

- ipc:// (default): the socket is 0600 in a 0700 directory; only this user can connect.
  With ``allow_users`` it is 0666 (its directory must let those users in) and the
  daemon serves only the uids it allows, each as a tenant (tenant_config.py).
- tcp:// + token: every Hello carries the token (compared in constant time); a
  session id (16 random bytes) is then required on every request. Without
  encryption the token is visible on the network: use it on trusted links, or CURVE.
- tcp:// + CURVE (zmq.auth): the transport is encrypted and only clients whose
  public key is in ``curve_public_keys_dir`` complete the handshake.
A refused client gets nothing but an error (or a failed handshake) and is counted.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import Callable

import zmq

from controller.daemon.config import AuthConfig

log = logging.getLogger(__name__)


class TokenCheck:
    """Hello's token against the configured one (None: no token required)."""

    def __init__(self, token: bytes | None) -> None:
        self._token = token

    @property
    def is_open(self) -> bool:
        """No shared token is configured (every Hello passes this check)."""
        return self._token is None

    def is_allowed(self, offered: bytes) -> bool:
        if self._token is None:
            return True
        return hmac.compare_digest(offered, self._token)


def bind_ipc(socket: zmq.Socket, address: str, shared: bool = False) -> None:
    """Bind with the socket file created 0600 (umask) and checked afterwards. ``shared``
    (``--allow-users``): 0666, other users may connect; the daemon admits only the uids
    it allows, by their side socket ticket (controller/daemon/fd_broker.py)."""
    old = os.umask(0o177)
    try:
        socket.bind(address)
    finally:
        os.umask(old)
    os.chmod(address[len("ipc://"):], 0o666 if shared else 0o600)


def start_curve(context: zmq.Context, socket: zmq.Socket, auth: AuthConfig,
                on_refused: Callable[[], None]):
    """Make ``socket`` a CURVE server that admits only the listed client keys."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=auth.curve_public_keys_dir)
    inner = authenticator
    original = inner._send_zap_reply

    def counted_reply(request_id, status_code, status_text, user_id="anonymous"):
        if status_code != b"200":
            on_refused()
        return original(request_id, status_code, status_text, user_id)

    inner._send_zap_reply = counted_reply
    public, secret = zmq.auth.load_certificate(auth.curve_secret_key_file)
    if secret is None:
        raise ValueError(f"{auth.curve_secret_key_file} holds no secret key")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return authenticator
