"""The ``subsys`` command line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from subsys.config import Settings, load_settings
from subsys.core.errors import ConfigError, SubsysError

__all__ = ["app", "main"]

app = typer.Typer(
    name="subsys",
    help="Live WebSocket subscriptions for databases that cannot push changes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="subsys.toml (default: $SUBSYS_CONFIG)", exists=False)


def _settings(config: Optional[Path], **node: object) -> Settings:
    try:
        return load_settings(config, overrides={"node": {k: v for k, v in node.items() if v is not None}})
    except ConfigError as exc:
        err.print(f"[bold red]config error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    host: Optional[str] = typer.Option(None, help="Listen address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Listen port (default 8080)."),
    node_id: Optional[str] = typer.Option(None, "--node-id", help="Node name (default host-port)."),
    log_format: Optional[str] = typer.Option(None, "--log-format", help="human or json."),
) -> None:
    """Run one node. Joins a Consul cluster when CONSUL_HTTP_ADDR (or the consul.address setting) is set."""
    from subsys.web.app import async_run
    from subsys.logs import setup_logging

    settings = _settings(config, host=host, port=port, node_id=node_id, log_format=log_format)
    setup_logging(fmt=settings.node.log_format, level=settings.node.log_level, node=settings.node_id)
    if not settings.feeds:
        err.print(f"[bold red]config error:[/] {settings.source}: feeds: no feed configured")
        raise typer.Exit(2)
    if not settings.database.url:
        err.print("[bold red]config error:[/] database.url: not set (set DATABASE_URL or database.url)")
        raise typer.Exit(2)
    try:
        asyncio.run(async_run(settings))
    except (OSError, SubsysError) as exc:  # port taken, Consul refused us (ACL), ...
        err.print(f"[bold red]cannot serve:[/] {exc}")
        raise typer.Exit(1) from None


@app.command()
def sub(
    topic: str = typer.Argument(..., help="Topic, e.g. orders:1"),
    url: str = typer.Option("ws://127.0.0.1:8080/ws", "--url", "-u", envvar="SUBSYS_URL", help="Node WebSocket URL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line."),
    count: int = typer.Option(0, help="Exit after this many messages (0: run until Ctrl-C)."),
) -> None:
    """Subscribe to a topic and print its snapshot and diffs as they arrive."""
    from subsys.cli.sub import run_sub

    try:
        code = asyncio.run(run_sub(topic, url=url, as_json=as_json, count=count))
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command()
def dev(
    nodes: int = typer.Option(3, help="Node processes to start (with Consul; 1 without)."),
    base_port: int = typer.Option(8080, help="First node's port; the others follow."),
    interval: float = typer.Option(0.5, help="Demo feeds' poll interval in seconds."),
    embedded: bool = typer.Option(False, "--embedded", help="Skip Consul; one node on the embedded coordinator."),
    data_dir: Optional[Path] = typer.Option(None, help="Where the embedded PostgreSQL keeps its data."),
) -> None:
    """A whole local cluster with demo data: PostgreSQL, Consul (when available), nodes, a writer."""
    from subsys.dev import run_dev

    try:
        code = asyncio.run(
            run_dev(nodes=nodes, base_port=base_port, interval=interval, embedded=embedded, data_dir=data_dir)
        )
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command()
def bench(
    what: str = typer.Argument(..., help="latency | memory | failover | consul-writes"),
    changes: int = typer.Option(200, help="latency: row changes to time."),
    clients: int = typer.Option(1000, help="memory: idle subscribed clients."),
    kills: int = typer.Option(20, help="failover: owner kills to time."),
    topics: int = typer.Option(100, help="consul-writes: subscribed topics."),
    interval: float = typer.Option(0.1, help="Feed poll interval in seconds."),
    check_ttl: float = typer.Option(3.0, "--check-ttl", help="failover: the nodes' Consul check TTL in seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Measure subsys on this machine (each bench starts what it needs and stops it)."""
    from subsys.bench import run_bench

    result = asyncio.run(
        run_bench(
            what,
            changes=changes,
            clients=clients,
            kills=kills,
            topics=topics,
            interval=interval,
            check_ttl=check_ttl,
        )
    )
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
