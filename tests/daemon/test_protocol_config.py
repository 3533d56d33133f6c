"""Wire protocol round trips and refusals; daemon config precedence and messages."""

import msgpack
import pytest

from controller.config import ConfigError
from controller.daemon import protocol as p
from controller.daemon.config import load_config, to_toml

LAYOUT_ENV = {"KVSTORE_LAYOUT_NUM_LAYERS": "2", "KVSTORE_LAYOUT_NUM_KV_HEADS": "2",
              "KVSTORE_LAYOUT_HEAD_DIM": "4", "KVSTORE_LAYOUT_PAGE_SIZE": "4"}


def test_every_message_round_trips():
    sid = b"s" * 16
    msgs = [p.Hello("c", 1, "fp", b"tok", 77, 88), p.Lookup(b"k" * 32, True), p.Release(7), p.CommitStore(2),
            p.LookupReply(3, 1, 1, p.pack_u32([4, 5]), 2, 9, p.pack_u32([1, 2])), p.WaitPrefetch(4, 0.5), p.PrefetchReply(4, 3, 1, 0, 2, False), p.StatsReply({"a": 1, "b": 2.5, "c": "x"}),
            p.ErrorReply("bad_message", "why")]
    for msg in msgs:
        table = p.REQUESTS if msg.TYPE in p.REQUESTS else p.REPLIES
        assert p.decode(p.encode(msg, 9, sid), table) == (msg, 9, sid)
    assert p.unpack_u32(p.pack_u32([0, 2**32 - 1])) == [0, 2**32 - 1]


@pytest.mark.parametrize("frame, code", [
    (msgpack.packb([p.VERSION + 1, 2, 1, b"", b""]), "bad_version"),
    (msgpack.packb([p.VERSION, 99, 1, b""]), "bad_message"),
    (msgpack.packb([p.VERSION, 2, 1, b"", b"x" * 15]), "bad_message"),       # key blob not 16 * n
    (msgpack.packb([p.VERSION, 2, 1, b"", "k" * 16]), "bad_message"),        # str, not bytes
    (msgpack.packb([p.VERSION, 3, 1, b"", -1]), "bad_message"),              # negative lease id
    (msgpack.packb([p.VERSION, 3, 1, b"", True]), "bad_message"),            # bool is not an int
    (msgpack.packb([p.VERSION, 3, 1, b"", 1, 2]), "bad_message"),            # extra field
    (msgpack.packb([p.VERSION, 3, 1, b"abc", 1]), "bad_message"),            # session of 3 bytes
    (msgpack.packb([p.VERSION, 2, 1, b"", b"\0" * 16 * (p.MAX_KEYS + 1), True, 0]), "too_large"),
    (b"\xc1", "bad_message"), (b"", "bad_message"),
    (msgpack.packb(msgpack.ExtType(1, b"x")), "bad_message"),
])
def test_bad_frames_are_refused_with_a_code(frame, code):
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frame, p.REQUESTS)
    assert info.value.code == code


def test_flags_override_environment_which_overrides_the_file(tmp_path):
    path = tmp_path / "kvstore.toml"
    path.write_text('host_pool_pages = 10\nlease_ttl_s = 9.0\n[layout]\nnum_layers = 3\n'
                    'num_kv_heads = 2\nhead_dim = 4\npage_size = 4\n[l3]\nconnector = "memory"\n')
    config = load_config(path, environ={"KVSTORE_HOST_POOL_PAGES": "20", "KVSTORE_LEASE_TTL_S": "8"},
                         flags={"host_pool_pages": "30"})
    assert (config.host_pool_pages, config.lease_ttl_s, config.layout.num_layers) == (30, 8.0, 3)
    assert config.l3.connector == "memory"
    assert "host_pool_pages = 30" in to_toml(config.to_toml_dict())


@pytest.mark.parametrize("env, flags, message", [
    ({}, {"layout.num_layers": None}, "host_pool_pages .from KVSTORE_HOST_POOL_PAGES. must be > 0"),
    ({"KVSTORE_LEASE_TTL_S": "soon"}, {}, "lease_ttl_s .from KVSTORE_LEASE_TTL_S."),
    ({}, {"address": "http://x"}, "expected ipc:///ABSOLUTE/PATH"),
    ({}, {"address": "tcp://127.0.0.1:7600"}, "no credentials"),
    ({}, {"heartbeat_interval_s": "4"}, "at most half of lease_ttl_s"),
    ({}, {"eviction_policy": "nope"}, "eviction_policy"),
])
def test_bad_settings_name_the_field(env, flags, message):
    environ = dict(LAYOUT_ENV, **env)
    if "KVSTORE_LEASE_TTL_S" not in env and not flags.get("address") and "heartbeat_interval_s" not in flags \
            and "eviction_policy" not in flags:
        environ["KVSTORE_HOST_POOL_PAGES"] = "0"
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ=environ, flags={k: v for k, v in flags.items() if v is not None})


def test_a_partial_layout_is_refused_and_unknown_file_keys_are_named(tmp_path):
    # No layout at all: a daemon of every layout (issue 19); part of one: refused.
    assert load_config(None, environ={}).layout is None
    with pytest.raises(ConfigError, match="layout.num_layers"):
        load_config(None, environ={"KVSTORE_LAYOUT_HEAD_DIM": "8"})
    path = tmp_path / "bad.toml"
    path.write_text("host_pool_pagez = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'host_pool_pagez'"):
        load_config(path, environ=LAYOUT_ENV)


def test_l3_encoding_is_a_daemon_setting():
    environ = dict(LAYOUT_ENV, KVSTORE_HOST_POOL_PAGES="8", KVSTORE_L3_CONNECTOR="memory",
                   KVSTORE_L3_ENCODING="fp8_e4m3")
    assert load_config(None, environ=environ).l3.encoding == "fp8_e4m3"
    assert load_config(None, environ=LAYOUT_ENV, flags={"host_pool_pages": "8"}).l3.encoding == "lossless"
    with pytest.raises(ConfigError, match="encoding 'fp9' is unknown"):
        load_config(None, environ=dict(environ, KVSTORE_L3_ENCODING="fp9"))


def test_hello_layout_is_checked_as_untrusted_input():
    """A Hello names the layout the daemon will build a pool of (issue 19): each field typed
    and bounded before any message exists; the ticket is b"" or 16 bytes."""
    good = p.Hello("c", 1, "fp", b"", 0, 0, (2, 1, 576, 64, "bfloat16", True), b"t" * 16, True)
    assert p.decode(p.encode(good, 1, b""), p.REQUESTS)[0] == good
    for bad in ([2, 1, 576], [0, 1, 8, 4, "float32", False], [2, 1, 1 << 20, 4, "float32", False],
                [2, 1, 8, 4, "complex64", False], [2, 1, 8, 4, "float32", 1], [2.0, 1, 8, 4, "float32", False],
                "mha"):
        frame = msgpack.packb([p.VERSION, p.Hello.TYPE, 1, b"", "c", 1, "fp", b"", 0, 0, bad, b"", False])
        with pytest.raises(p.ProtocolError, match="layout"):
            p.decode(frame, p.REQUESTS)
    frame = msgpack.packb([p.VERSION, p.Hello.TYPE, 1, b"", "c", 1, "fp", b"", 0, 0, [], b"short", False])
    with pytest.raises(p.ProtocolError, match="16 bytes"):
        p.decode(frame, p.REQUESTS)
