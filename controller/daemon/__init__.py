"""The sidecar daemon (``kvstore serve``): server, wire protocol, auth, metrics, config.

Importing this package imports nothing else: the client library
(the package ``controller.client``) imports only ``controller.daemon.protocol``.
"""
