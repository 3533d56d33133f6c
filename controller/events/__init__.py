"""KV events: what enters and leaves each tier of a daemon, in vLLM's KV-event wire format.

- :mod:`controller.events.wire`: the format (msgpack batches, medium names, frames),
  encode and a checking decode; no sockets.
- :mod:`controller.events.publisher`: the daemon's ZMQ PUB socket, the replay ROUTER
  and the per-core sources the cache reports to.
- :mod:`controller.events.subscriber`: a subscriber that rebuilds one daemon's contents
  per tier from events alone (replay on a gap, reset on a new incarnation).
"""
