"""DaemonConfig: what ``kvstore serve`` runs with, merged from a TOML file, KVSTORE_* and flags.

Precedence: flags > environment > file > defaults. Every setting has one dotted
name; the file uses it as TOML tables, the environment upper-cases it with
underscores, and the flag uses dashes::

    layout.num_layers   [layout] num_layers = 32   KVSTORE_LAYOUT_NUM_LAYERS=32   --layout-num-layers 32
    l3.options          [l3.options] path = ".."  KVSTORE_L3_OPTIONS='{"path": ".."}' (JSON)

Values from the environment and flags are text and are parsed by the field's
type; every value is checked, and an error names the field and where it came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from controller.config import ConfigError, ControllerConfig, L3Config
from controller.daemon.address import parse_address
from kvstore.layout import KVLayout, LayoutError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "KVSTORE_"


def runtime_dir() -> Path:
    """Per-user directory for sockets and lock files ($XDG_RUNTIME_DIR/kvstore or /tmp/kvstore-<uid>)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "kvstore"
    return Path(f"/tmp/kvstore-{os.getuid()}")


def default_address() -> str:
    return f"ipc://{runtime_dir() / 'kvstore.sock'}"


@dataclass(frozen=True)
class AuthConfig:
    """Who may talk to a tcp:// daemon (ipc:// is guarded by file permissions)."""

    token_file: str | None = None
    """File holding the shared token clients present in Hello (read at start; keep it 0600)."""
    token: str | None = None
    """The shared token itself, from KVSTORE_AUTH_TOKEN or the config file (never a flag:
    ``ps`` shows command lines to every user; prefer token_file)."""
    curve_secret_key_file: str | None = None
    """The daemon's CURVE secret key file (zmq.auth.create_certificates); enables CURVE."""
    curve_public_keys_dir: str | None = None
    """Directory of the public keys of clients allowed to connect (needed with CURVE)."""

    @property
    def is_curve(self) -> bool:
        return self.curve_secret_key_file is not None

    def read_token(self) -> bytes | None:
        if self.token is not None:
            if not self.token.strip():
                raise ConfigError("auth.token is empty; an empty token would admit every client")
            return self.token.encode()
        if self.token_file is not None:
            token = Path(self.token_file).read_bytes().strip()
            if not token:  # an empty token would admit every client
                raise ConfigError(f"auth.token_file {self.token_file} is empty; write the shared "
                                  "token into it")
            return token
        return None


@dataclass(frozen=True)
class DaemonConfig:
    """Everything one daemon runs with. Without a layout it serves every layout its
    clients name, a pool per (tenant, layout) under one budget (``host_pool_bytes``);
    with ``--layout-*`` and no tenant settings it is a legacy daemon: one layout, one
    /dev/shm segment of ``host_pool_pages`` pages, one trust domain."""

    layout: KVLayout | None = None
    """The one KV layout this daemon serves (None: every layout its clients name)."""
    address: str = field(default_factory=default_address)
    """ipc://PATH (default: in the per-user runtime directory) or tcp://HOST:PORT (needs auth)."""
    host_pool_pages: int = 4096
    """Pages of shared host memory (L2) of a legacy daemon (fixed layout, no tenants)."""
    host_pool_bytes: int | None = None
    """The memory budget all pools share (the default: ``default_pool_bytes()``, a quarter
    of physical memory up to 64 GiB); more than physical memory is refused."""
    allow_users: str | None = None
    """Other users (names or uids, comma-separated) whose clients may use this daemon, each
    as a tenant of its own; their socket must be reachable (an --address in a directory
    they can enter). Default: only this user."""
    tenants: Mapping[str, Any] = field(default_factory=dict)
    """Per-tenant settings: ``[tenants.NAME]`` with ``token_file`` (or ``token``: a client
    presenting it is this tenant), ``l2_pages`` and ``l3_bytes`` quotas. Tenants by uid are
    named ``uid:N``; ``[tenants."*"]`` holds the default quotas."""
    eviction_policy: str = ControllerConfig.eviction_policy
    """Which L2 page goes first when full; see kvstore.eviction.policy_names()."""
    l3: L3Config = field(default_factory=L3Config)
    """The L3 store behind L2 (connector, options, write_policy, timeout_s)."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """Credentials required on tcp://."""
    lease_ttl_s: float = 5.0
    """A client silent for this long is presumed gone. A client whose process the daemon
    watches keeps its leases and reservations while that process lives (paused, say),
    and loses them at once when it exits, even before this TTL. An unwatched one
    (another pid namespace) loses its session: its leases end (its loads then fail as
    LoadError if a slot is reused) and its reserved slots are quarantined."""
    heartbeat_interval_s: float = 1.0
    """How often clients say they are alive (must be well under lease_ttl_s)."""
    reservation_ttl_s: float = 30.0
    """A store reserved but not committed for this long is reported (log, metric). Its
    slots stay the writer's until it commits or aborts, or its session ends: a slow but
    live writer may still be copying into them."""
    orphan_quarantine_s: float | None = None
    """How long the reserved slots of a silent, unwatched client stay out of use after its
    session ended (a paused writer could still copy into them). None: until the daemon
    stops (never a wrong byte; `kvstore status` shows the count). A number trades that
    guarantee for the memory: a writer paused longer could land a late copy."""
    max_leases_per_client: int = 65536
    """Open leases one client may hold; more are refused (a leaking client can't pin L2)."""
    flush_deadline_s: float = 30.0
    """On SIGTERM, how long write-back pages may take to reach L3."""
    metrics_port: int | None = None
    """Port of the Prometheus text endpoint (None: no endpoint)."""
    metrics_host: str = "127.0.0.1"
    """Interface of the metrics endpoint."""
    prefault_host_pool: bool = False
    """Touch every page of the host pool at start: some hosts hand memory over on first
    touch (seconds per GiB), which would otherwise land on the first stores."""
    events: str | None = None
    """Where to publish KV events (what enters and leaves L2 and L3, in vLLM's format):
    a ZMQ PUB address, tcp://HOST:PORT (HOST may be *) or ipc:///PATH. None: no events."""
    events_replay: str | None = None
    """The replay ROUTER address, where a late or lossy subscriber asks for the batches
    from a sequence number on (vLLM's replay protocol). None: no replay."""
    events_topic: str = ""
    """The topic frame of every event message (subscribers filter on its prefix)."""
    events_buffer_batches: int = 10_000
    """Recent event batches kept for replay (a ring; also capped at 256 MiB)."""

    def __post_init__(self) -> None:
        if parse_address(self.address).is_tcp:
            has_tenant_tokens = any(isinstance(t, Mapping) and ("token" in t or "token_file" in t)
                                    for t in dict(self.tenants).values())
            if self.auth.read_token() is None and not self.auth.is_curve and not has_tenant_tokens:
                raise ConfigError(
                    f"address {self.address} is tcp:// but no credentials are set: set auth.token_file "
                    "(or KVSTORE_AUTH_TOKEN), auth.curve_secret_key_file + auth.curve_public_keys_dir, "
                    "or tenants with a token_file each")
            if self.auth.is_curve and not self.auth.curve_public_keys_dir:
                raise ConfigError("auth.curve_secret_key_file needs auth.curve_public_keys_dir")
        if self.heartbeat_interval_s * 2 > self.lease_ttl_s:
            raise ConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half of "
                f"lease_ttl_s ({self.lease_ttl_s})")
        ControllerConfig(host_pool_pages=self.host_pool_pages, eviction_policy=self.eviction_policy,
                         l3=self.l3)  # validates those fields with its own messages
        if not self.is_legacy:
            check_budget(self.budget_bytes())
            from controller.daemon.tenant_config import parse_tenants

            parse_tenants(self.tenants, self.allow_users)   # errors name the entry
        self._check_events()

    @property
    def is_legacy(self) -> bool:
        """One layout in one /dev/shm segment, one trust domain (the pre-tenant daemon)."""
        return (self.layout is not None and not self.tenants and not self.allow_users
                and self.host_pool_bytes is None)

    def budget_bytes(self) -> int:
        """The bytes all pools share (checked against this machine in ``__post_init__``)."""
        if self.is_legacy:
            return self.host_pool_pages * self.layout.page_bytes
        return self.host_pool_bytes if self.host_pool_bytes is not None else default_pool_bytes()

    def _check_events(self) -> None:
        named = {"address": self.address}
        for name in ("events", "events_replay"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parse_address(value)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}".replace("daemon address", "address")) from None
            clash = next((n for n, v in named.items() if v == value), None)
            if clash is not None:
                raise ConfigError(f"{name} and {clash} are both {value}: give each its own address")
            named[name] = value
        if self.events_replay is not None and self.events is None:
            raise ConfigError("events_replay is set but events is not: set events (the PUB "
                              "address) too")

    def controller_config(self) -> ControllerConfig:
        return ControllerConfig(host_pool_pages=self.host_pool_pages,
                                eviction_policy=self.eviction_policy, l3=self.l3,
                                prefault_host_pool=self.prefault_host_pool)

    def to_toml_dict(self) -> dict[str, Any]:
        """The effective configuration as nested tables (secrets masked)."""
        out: dict[str, Any] = {}
        for spec in FIELDS:
            value = _get(self, spec.name)
            if value is None:
                continue
            if spec.name == "auth.token":
                value = "***"
            if spec.name == "tenants":
                value = {name: {k: ("***" if k == "token" else v) for k, v in dict(t).items()}
                         for name, t in dict(value).items()}
            if isinstance(value, Mapping):
                value = dict(value)
            table = out
            *parents, leaf = spec.name.split(".")
            for p in parents:
                table = table.setdefault(p, {})
            table[leaf] = value
        return out


# ---- settings table -------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    """Text (environment, flags) -> value."""
    kind: tuple[type, ...]
    """Accepted Python types of a TOML value."""
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.replace(".", "_").upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace(".", "-").replace("_", "-")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


_GIB = 1 << 30
_MIN_BUDGET = 64 << 20


def default_pool_bytes(physical: int | None = None) -> int:
    """A quarter of physical memory, at most 64 GiB and at least 64 MiB."""
    from kvstore.host_memory import read_host_memory

    physical = physical if physical is not None else read_host_memory().physical_bytes
    if physical is None:
        return 4 * _GIB
    return max(_MIN_BUDGET, min(physical // 4, 64 * _GIB))


def check_budget(budget: int, physical: int | None = None) -> None:
    """Refuse a budget larger than this machine's memory (ConfigError with the numbers)."""
    from kvstore.host_memory import read_host_memory

    physical = physical if physical is not None else read_host_memory().physical_bytes
    if budget <= 0:
        raise ConfigError(f"host_pool_bytes must be > 0, got {budget}")
    if physical is not None and budget > physical:
        raise ConfigError(f"host_pool_bytes {budget / _GIB:.1f} GiB exceeds this machine's physical "
                          f"memory ({physical / _GIB:.1f} GiB): the pools would be OOM-killed once "
                          f"full; give at most {physical // 2 // _GIB} GiB (half), or leave it out for "
                          f"{default_pool_bytes(physical) / _GIB:.1f} GiB")


def parse_bytes(text: str) -> int:
    """``8G``, ``512M``, ``65536`` (K, M, G, T: powers of 1024)."""
    text = text.strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale != 1 else text
    if number.upper().endswith("I"):
        raise ValueError(f"write sizes as 8G or 512M, got {text!r}")
    value = float(number) * scale
    if not value.is_integer() and scale == 1:
        raise ValueError(f"expected a byte count like 8G, got {text!r}")
    return int(value)


def _json_table(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


_I, _F, _S = (int,), (int, float), (str,)
FIELDS: tuple[Setting, ...] = (
    Setting("address", str, _S, "ipc://PATH or tcp://HOST:PORT"),
    Setting("host_pool_pages", int, _I, "pages of shared host memory (L2) of a one-layout daemon"),
    Setting("host_pool_bytes", parse_bytes, (int, str), "memory budget of all pools (e.g. 32G; "
            "default a quarter of physical memory, at most 64G)"),
    Setting("allow_users", str, _S, "other users (names or uids, comma-separated) that may "
            "connect, each a tenant of its own"),
    Setting("tenants", _json_table, (dict,), "per-tenant tokens and quotas (a table; JSON in "
            "env/flags): {NAME: {token_file, l2_pages, l3_bytes}}"),
    Setting("eviction_policy", str, _S, "L2 eviction policy name"),
    Setting("layout.num_layers", int, _I, "layers of the KV layout"),
    Setting("layout.num_kv_heads", int, _I, "KV heads per layer (per TP rank)"),
    Setting("layout.head_dim", int, _I, "elements per head"),
    Setting("layout.page_size", int, _I, "tokens per page"),
    Setting("layout.dtype", str, _S, "element type (bfloat16, float16, float32, ...)"),
    Setting("layout.is_mla", _bool, (bool,), "one latent tensor per layer (MLA)"),
    Setting("l3.connector", str, _S, "L3 store: disk, redis, redis_cluster, mooncake, memory"),
    Setting("l3.options", _json_table, (dict,), "L3 connector options (a table; JSON in env/flags)"),
    Setting("l3.write_policy", str, _S, "write_back, write_through or write_through_selective"),
    Setting("l3.timeout_s", float, _F, "longest wait for one batched L3 call"),
    Setting("l3.encoding", str, _S, "L3 copies: lossless (default) or fp8_e4m3 (half the bytes, lossy)"),
    Setting("l3.selective_hits", int, _I, "write_through_selective: lookup hits before a page goes to L3"),
    Setting("l3.backup_queue_bytes", int, _I, "memory for evicted pages waiting for their L3 write"),
    Setting("prefault_host_pool", _bool, (bool,), "touch every page of L2 at start (slower start, "
            "no first-touch cost on the first stores)"),
    Setting("auth.token_file", str, _S, "file holding the shared token (tcp)"),
    Setting("auth.token", str, _S, "refused: use --auth-token-file or KVSTORE_AUTH_TOKEN "
            "(a flag shows the token in ps)"),
    Setting("auth.curve_secret_key_file", str, _S, "daemon CURVE secret key file (tcp)"),
    Setting("auth.curve_public_keys_dir", str, _S, "directory of allowed client CURVE public keys"),
    Setting("lease_ttl_s", float, _F, "seconds of silence after which a client's leases are reclaimed"),
    Setting("heartbeat_interval_s", float, _F, "seconds between client heartbeats"),
    Setting("reservation_ttl_s", float, _F, "seconds a store may stay reserved before it is reported as overdue"),
    Setting("orphan_quarantine_s", float, _F, "seconds the slots of a silent, unwatchable client stay out of use"),
    Setting("max_leases_per_client", int, _I, "open leases one client may hold"),
    Setting("flush_deadline_s", float, _F, "seconds to write back pages to L3 on shutdown"),
    Setting("metrics_port", int, _I, "port of the Prometheus endpoint"),
    Setting("metrics_host", str, _S, "interface of the Prometheus endpoint"),
    Setting("events", str, _S, "publish KV events (vLLM format) on this ZMQ PUB address"),
    Setting("events_replay", str, _S, "ZMQ ROUTER address answering replay requests for KV events"),
    Setting("events_topic", str, _S, "topic frame of the KV-event messages"),
    Setting("events_buffer_batches", int, _I, "KV-event batches kept for replay"),
)
_BY_NAME = {s.name: s for s in FIELDS}
_POSITIVE = {"host_pool_pages", "lease_ttl_s", "heartbeat_interval_s", "reservation_ttl_s",
             "orphan_quarantine_s",
             "max_leases_per_client", "flush_deadline_s", "l3.timeout_s", "l3.selective_hits",
             "l3.backup_queue_bytes", "events_buffer_batches"}


def _get(config: DaemonConfig, name: str) -> Any:
    obj: Any = config
    for part in name.split("."):
        obj = getattr(obj, part) if obj is not None else None   # no layout: its fields are None
    return obj


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if name in _BY_NAME:
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return flat


def read_sources(
    config_file: str | os.PathLike | None,
    environ: Mapping[str, str],
    flags: Mapping[str, str | None],
) -> dict[str, tuple[Any, str]]:
    """name -> (value, where it came from), flags over environment over file."""
    values: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        for name, value in _flatten(table).items():
            values[name] = (value, f"{config_file}")
    _refuse_secret_flags(flags)
    for source, texts in (("environment", {s.name: environ.get(s.env) for s in FIELDS}),
                          ("flag", flags)):
        for name, text in texts.items():
            if text is None:
                continue
            spec = _BY_NAME[name]
            where = spec.env if source == "environment" else spec.flag
            try:
                values[name] = (spec.parse(text), where)
            except ValueError as exc:
                raise ConfigError(f"{name} (from {where}): {exc}") from None
    return values


def _refuse_secret_flags(flags: Mapping[str, str | None]) -> None:
    """A token on the command line is shown to every user of the host (ps, /proc/PID/cmdline)."""
    tenants = flags.get("tenants")
    if tenants is not None and '"token"' in tenants:
        raise ConfigError(f"{_BY_NAME['tenants'].flag} with a token would show it to every user of "
                          "this host (ps): give each tenant a token_file (chmod 600), or set "
                          f"{_BY_NAME['tenants'].env} or the config file")
    if flags.get("auth.token") is not None:
        raise ConfigError(f"{_BY_NAME['auth.token'].flag} would show the token to every user of this "
                          "host (ps); put it in a file only the daemon's user can read (chmod 600) "
                          f"and pass {_BY_NAME['auth.token_file'].flag} FILE, or set "
                          f"{_BY_NAME['auth.token'].env}")


def build_config(values: Mapping[str, tuple[Any, str]]) -> DaemonConfig:
    """A checked DaemonConfig from ``read_sources`` output; errors name the field and source."""
    for name, (value, where) in values.items():
        spec = _BY_NAME[name]
        if type(value) not in spec.kind and not (spec.kind == _F and type(value) is int):
            raise ConfigError(f"{name} (from {where}) must be {'/'.join(t.__name__ for t in spec.kind)}, "
                              f"got {value!r}")
        if name in _POSITIVE and value <= 0:
            raise ConfigError(f"{name} (from {where}) must be > 0, got {value!r}")
        if name == "metrics_port" and not 0 < value < 65536:
            raise ConfigError(f"metrics_port (from {where}) must be in 1..65535, got {value!r}")
    plain = {name: value for name, (value, _) in values.items()}
    groups: dict[str, dict[str, Any]] = {"layout": {}, "l3": {}, "auth": {}}
    top: dict[str, Any] = {}
    for name, value in plain.items():
        head, _, leaf = name.partition(".")
        (groups[head].__setitem__(leaf, value) if leaf else top.__setitem__(name, value))
    missing = [f"layout.{f}" for f in ("num_layers", "num_kv_heads", "head_dim", "page_size")
               if f not in groups["layout"]]
    if missing and groups["layout"]:
        raise ConfigError(f"a daemon of one KV layout needs all of it: set {', '.join(missing)} "
                          f"(e.g. [layout] in --config, or {_BY_NAME[missing[0]].flag}); or set no "
                          "layout.* at all to serve every layout its clients name")
    if isinstance(top.get("host_pool_bytes"), str):
        try:
            top["host_pool_bytes"] = parse_bytes(top["host_pool_bytes"])
        except ValueError as exc:
            raise ConfigError(f"host_pool_bytes (from {values['host_pool_bytes'][1]}): {exc}") from None
    try:
        layout = KVLayout(**groups["layout"]) if groups["layout"] else None
        l3 = L3Config(**groups["l3"])
        return DaemonConfig(layout=layout, l3=l3, auth=AuthConfig(**groups["auth"]), **top)
    except (LayoutError, OSError) as exc:
        raise ConfigError(str(exc)) from None


def load_config(config_file=None, environ: Mapping[str, str] | None = None,
                flags: Mapping[str, str | None] | None = None) -> DaemonConfig:
    return build_config(read_sources(config_file, os.environ if environ is None else environ,
                                     flags or {}))


def _toml_key(key: str) -> str:
    """A bare TOML key, or a quoted one (tenant names like ``uid:1001`` or ``*``)."""
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def to_toml(table: Mapping[str, Any], prefix: str = "") -> str:
    """A small TOML writer for ``--print-config`` (scalars and nested tables only)."""
    lines, subtables = [], []
    for key, value in table.items():
        if isinstance(value, Mapping):
            subtables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {json.dumps(value)}")
    out = "\n".join(lines)
    for key, value in subtables:
        name = f"{prefix}{_toml_key(key)}"
        out += f"\n\n[{name}]\n" + to_toml(value, name + ".")
    return out.strip("\n") + "\n"
