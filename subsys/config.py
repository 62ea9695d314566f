"""Configuration: a TOML file, environment overrides, then CLI flags.

Precedence (lowest first): built-in defaults, ``subsys.toml`` (path from
``--config`` or ``SUBSYS_CONFIG``), environment variables, CLI flags.
Secrets (cluster secret, admin token, Consul token, database URL) are read
from the environment or the file, never from argv, and never logged.
Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from subsys.core.errors import ConfigError
from subsys.core.topics import PARAM_TYPES

__all__ = [
    "Feed",
    "NodeConfig",
    "DatabaseConfig",
    "LimitsConfig",
    "ConsulConfig",
    "Settings",
    "load_settings",
    "ENV_OVERRIDES",
]

_FEED_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Feed:
    name: str
    sql: str
    key: tuple[str, ...]
    param: str = "text"
    interval: float = 1.0
    max_rows: int = 10_000
    statement_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    node_id: str = ""
    advertise_url: str = ""
    grace_period: float = 5.0
    log_format: str = "human"
    log_level: str = "INFO"
    event_loop: str = "asyncio"  # asyncio | uvloop
    admin_host: str = ""  # a separate listener for /admin/v1 (default: the node's own host)
    admin_port: int = 0  # 0: the admin API is on the node's port; else only on this port
    admin_insecure: bool = False  # dev only: the admin API without a token (announced loudly)
    zombie_interval: float = 5.0  # seconds between zombie scans of the janitor node (0: no scans)
    zombie_reap: bool = True  # the janitor fixes the zombies that are safe to fix on its own


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = field(default="", repr=False)  # may carry a password: never printed
    min_pool: int = 0
    max_pool: int = 10
    retry_initial: float = 0.2
    retry_max: float = 5.0
    merged_polling: bool = True  # one statement per feed per tick for all its owned topics
    batch_size: int = 100  # topics per merged statement


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_frame_bytes: int = 16_384
    max_subscriptions: int = 100
    messages_per_second: float = 50.0
    message_burst: int = 100
    send_queue: int = 1_000
    send_timeout: float = 10.0
    heartbeat: float = 20.0
    compression: str = "off"  # off | deflate (permessage-deflate, when the client offers it)


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    address: str = ""
    prefix: str = "subsys/"
    check_ttl: float = 3.0
    lock_delay: float = 0.5
    wait: float = 30.0
    datacenter: str = ""
    fast_failover: bool = True  # destroy a provably dead owner's session before its check TTL runs out


@dataclass(frozen=True, slots=True)
class Settings:
    node: NodeConfig = field(default_factory=NodeConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    feeds: Mapping[str, Feed] = field(default_factory=dict)
    source: str = "<defaults>"
    # Secrets: never printed (see __repr__).
    cluster_secret: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)  # operator role
    admin_read_token: str = field(default="", repr=False)  # read role
    consul_token: str = field(default="", repr=False)

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def advertise_url(self) -> str:
        return self.node.advertise_url

    @property
    def uses_consul(self) -> bool:
        return bool(self.consul.address)


# Environment variable -> (section, key). Secrets are handled separately.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "DATABASE_URL": ("database", "url"),
    "SUBSYS_HOST": ("node", "host"),
    "SUBSYS_PORT": ("node", "port"),
    "SUBSYS_NODE_ID": ("node", "node_id"),
    "SUBSYS_ADVERTISE_URL": ("node", "advertise_url"),
    "SUBSYS_GRACE_PERIOD": ("node", "grace_period"),
    "SUBSYS_LOG_FORMAT": ("node", "log_format"),
    "SUBSYS_LOG_LEVEL": ("node", "log_level"),
    "CONSUL_HTTP_ADDR": ("consul", "address"),
    "SUBSYS_CONSUL_PREFIX": ("consul", "prefix"),
    "SUBSYS_CONSUL_CHECK_TTL": ("consul", "check_ttl"),
    "SUBSYS_ADMIN_INSECURE": ("node", "admin_insecure"),
    "SUBSYS_ADMIN_PORT": ("node", "admin_port"),
    "SUBSYS_ZOMBIE_REAP": ("node", "zombie_reap"),
    "SUBSYS_ZOMBIE_INTERVAL": ("node", "zombie_interval"),
}
_SECRET_ENV = {
    "SUBSYS_CLUSTER_SECRET": "cluster_secret",
    "SUBSYS_ADMIN_TOKEN": "admin_token",
    "SUBSYS_ADMIN_READ_TOKEN": "admin_read_token",
    "CONSUL_HTTP_TOKEN": "consul_token",
}
_SECRET_NAMES = ("cluster_secret", "admin_token", "admin_read_token", "consul_token")
_SECTIONS = {
    "node": NodeConfig,
    "database": DatabaseConfig,
    "limits": LimitsConfig,
    "consul": ConsulConfig,
}


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build validated settings. ``overrides`` are CLI flags: ``{"node": {"port": 9000}}``."""
    env = os.environ if env is None else env
    if path is None and env.get("SUBSYS_CONFIG"):
        path = env["SUBSYS_CONFIG"]
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("file not found", source=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None

    unknown = set(raw) - set(_SECTIONS) - {"feeds", "secrets"}
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}", source=source)

    layered: dict[str, dict[str, Any]] = {name: dict(_table(raw, name, source)) for name in _SECTIONS}
    env_source: dict[tuple[str, str], str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            layered[section][key] = env[var]
            env_source[(section, key)] = var
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                layered[section][key] = value
                env_source[(section, key)] = f"--{key.replace('_', '-')}"

    sections = {
        name: _build(cls, layered[name], source, name, env_source) for name, cls in _SECTIONS.items()
    }
    node: NodeConfig = sections["node"]
    node = _complete_node(node, source)
    consul: ConsulConfig = sections["consul"]
    if consul.prefix and not consul.prefix.endswith("/"):
        consul = dataclasses.replace(consul, prefix=consul.prefix + "/")
    _check_ranges(node, sections["database"], sections["limits"], consul, source)

    secrets = _table(raw, "secrets", source)
    unknown_secrets = set(secrets) - set(_SECRET_NAMES)
    if unknown_secrets:
        raise ConfigError(
            f"unknown key(s): {', '.join(sorted(unknown_secrets))} (known: {', '.join(_SECRET_NAMES)})",
            source=source,
            key="secrets",
        )
    secret_values = {name: str(secrets.get(name, "")) for name in _SECRET_NAMES}
    for var, name in _SECRET_ENV.items():
        if env.get(var):
            secret_values[name] = env[var]

    if consul.address and not secret_values.get("cluster_secret"):
        raise ConfigError(
            "a cluster (consul.address / CONSUL_HTTP_ADDR set) needs the peer-link secret: "
            "set SUBSYS_CLUSTER_SECRET in the environment",
            source=source,
            key="SUBSYS_CLUSTER_SECRET",
        )
    feeds = _parse_feeds(raw.get("feeds", {}), source)
    return Settings(
        node=node,
        database=sections["database"],
        limits=sections["limits"],
        consul=consul,
        feeds=feeds,
        source=source,
        **secret_values,
    )


def _table(raw: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError("must be a table", source=source, key=name)
    return value


def _build(cls: type, values: Mapping[str, Any], source: str, section: str, origins: Mapping) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = origins.get((section, key), f"{section}.{key}")
        if key not in fields:
            raise ConfigError(f"unknown key (known: {', '.join(fields)})", source=source, key=where)
        kwargs[key] = _coerce(value, type(fields[key].default), source, where)
    return cls(**kwargs)


def _coerce(value: Any, kind: type, source: str, key: str) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"expected {kind.__name__}, got {value!r}", source=source, key=key)


def _complete_node(node: NodeConfig, source: str) -> NodeConfig:
    node_id = node.node_id or f"{socket.gethostname().split('.')[0]}-{node.port}"
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ConfigError(
            "must be 1-63 chars of letters, digits, '_', '.', '-'", source=source, key="node.node_id"
        )
    host = node.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()  # peers cannot dial a wildcard address; set advertise_url if this is wrong
    advertise = node.advertise_url or f"http://{host}:{node.port}"
    if node.log_format not in ("human", "json"):
        raise ConfigError("must be 'human' or 'json'", source=source, key="node.log_format")
    if node.event_loop not in ("asyncio", "uvloop"):
        raise ConfigError("must be 'asyncio' or 'uvloop'", source=source, key="node.event_loop")
    if node.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL", source=source, key="node.log_level")
    return dataclasses.replace(node, node_id=node_id, advertise_url=advertise.rstrip("/"))


def _check_ranges(node, database, limits, consul, source: str) -> None:
    checks = [
        ("node.port", 0 <= node.port <= 65535, "must be 0-65535"),
        ("node.admin_port", 0 <= node.admin_port <= 65535, "must be 0-65535 (0: on the node's port)"),
        ("node.grace_period", node.grace_period >= 0, "must be >= 0"),
        ("node.zombie_interval", node.zombie_interval == 0 or node.zombie_interval >= 0.2, "must be 0 (off) or >= 0.2"),
        (
            "database.url",
            not database.url or database.url.split("://", 1)[0] in ("postgresql", "postgres"),
            "must be a postgresql://user:password@host:port/database URL",  # never echo it: may hold a password
        ),
        ("database.min_pool", database.min_pool >= 0, "must be >= 0"),
        ("database.max_pool", database.max_pool >= max(1, database.min_pool), "must be >= min_pool and >= 1"),
        ("database.retry_initial", database.retry_initial > 0, "must be > 0"),
        ("database.retry_max", database.retry_max >= database.retry_initial, "must be >= retry_initial"),
        ("limits.max_frame_bytes", limits.max_frame_bytes >= 256, "must be >= 256"),
        ("limits.max_subscriptions", limits.max_subscriptions >= 1, "must be >= 1"),
        ("limits.messages_per_second", limits.messages_per_second > 0, "must be > 0"),
        ("limits.message_burst", limits.message_burst >= 1, "must be >= 1"),
        ("limits.send_queue", limits.send_queue >= 8, "must be >= 8"),
        ("limits.send_timeout", limits.send_timeout > 0, "must be > 0"),
        ("limits.heartbeat", limits.heartbeat > 0, "must be > 0"),
        ("limits.compression", limits.compression in ("off", "deflate"), "must be 'off' or 'deflate'"),
        ("database.batch_size", 1 <= database.batch_size <= 10_000, "must be 1-10000"),
        ("consul.check_ttl", consul.check_ttl >= 2, "must be >= 2 (seconds)"),
        ("consul.lock_delay", 0 <= consul.lock_delay <= 60, "must be 0-60 (seconds)"),
        ("consul.wait", 1 <= consul.wait <= 600, "must be 1-600 (seconds)"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(message, source=source, key=key)


def _parse_feeds(raw: Any, source: str) -> dict[str, Feed]:
    if not isinstance(raw, dict):
        raise ConfigError("must be a table of feeds", source=source, key="feeds")
    feeds: dict[str, Feed] = {}
    known = {f.name for f in dataclasses.fields(Feed)} - {"name"}
    for name, table in raw.items():
        where = f"feeds.{name}"
        if not _FEED_NAME_RE.fullmatch(name):
            raise ConfigError("feed name must match [a-z][a-z0-9_]{0,63}", source=source, key=where)
        if not isinstance(table, dict):
            raise ConfigError("must be a table", source=source, key=where)
        extra = set(table) - known
        if extra:
            raise ConfigError(f"unknown key(s): {', '.join(sorted(extra))}", source=source, key=where)
        sql = table.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise ConfigError("is required and must be a non-empty string", source=source, key=f"{where}.sql")
        if "$1" not in sql:
            raise ConfigError(
                "must use $1 for the topic parameter (it is bound, never interpolated)",
                source=source,
                key=f"{where}.sql",
            )
        if set(re.findall(r"\$(\d+)", sql)) != {"1"}:
            raise ConfigError("may only use the parameter $1", source=source, key=f"{where}.sql")
        key = table.get("key")
        if isinstance(key, str):
            key = [key]
        if not isinstance(key, list) or not key or not all(isinstance(k, str) and k for k in key):
            raise ConfigError(
                "is required: a column name or a list of column names", source=source, key=f"{where}.key"
            )
        param = table.get("param", "text")
        if param not in PARAM_TYPES:
            raise ConfigError(f"must be one of {', '.join(PARAM_TYPES)}", source=source, key=f"{where}.param")
        interval = _coerce(table.get("interval", 1.0), float, source, f"{where}.interval")
        max_rows = _coerce(table.get("max_rows", 10_000), int, source, f"{where}.max_rows")
        timeout = _coerce(table.get("statement_timeout", 5.0), float, source, f"{where}.statement_timeout")
        if not 0.01 <= interval <= 3600:
            raise ConfigError("must be between 0.01 and 3600 seconds", source=source, key=f"{where}.interval")
        if not 1 <= max_rows <= 1_000_000:
            raise ConfigError("must be between 1 and 1000000", source=source, key=f"{where}.max_rows")
        if not 0.01 <= timeout <= 600:
            raise ConfigError(
                "must be between 0.01 and 600 seconds", source=source, key=f"{where}.statement_timeout"
            )
        feeds[name] = Feed(
            name=name,
            sql=sql.strip().rstrip(";"),
            key=tuple(key),
            param=param,
            interval=interval,
            max_rows=max_rows,
            statement_timeout=timeout,
        )
    return feeds
