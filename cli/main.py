"""The ``subsys`` command line."""

from __future__ import annotations

import asyncio
import json
import signal
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
    what: str = typer.Argument(..., help="latency | fanout | dbload | memory | failover | consul-writes"),
    changes: Optional[int] = typer.Option(None, help="latency: row changes to time (200)."),
    subscribers: Optional[int] = typer.Option(None, help="fanout: subscribers of the one topic, on each server (1000)."),
    rounds: Optional[int] = typer.Option(None, help="fanout: published changes to time (20)."),
    client_procs: Optional[int] = typer.Option(
        None, "--client-procs", help="fanout, memory: client processes holding the connections (4; memory 2)."
    ),
    event_loop: Optional[str] = typer.Option(
        None, "--event-loop",
        help="fanout: the node's node.event_loop, asyncio or uvloop (needs pip install 'subsys\\[fast]').",
    ),
    clients: Optional[int] = typer.Option(None, help="memory: idle subscribed clients per row (1000)."),
    topics: Optional[int] = typer.Option(None, help="dbload: subscribed topics (1000); consul-writes: (100)."),
    window: Optional[float] = typer.Option(None, help="dbload (30), consul-writes (60): seconds counted."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="dbload: database.batch_size for the merged-polling phase (100)."
    ),
    kills: Optional[int] = typer.Option(None, help="failover: faults of each kind, per fast_failover mode (20)."),
    kinds: Optional[str] = typer.Option(None, help="failover: fault kinds, of kill,kill-restart,stop (all)."),
    fast_failover: Optional[str] = typer.Option(
        None, "--fast-failover", help="failover: consul.fast_failover both | true | false (both: the ratio)."
    ),
    restart_after: Optional[str] = typer.Option(
        None, "--restart-after",
        help="failover: restart delays after SIGKILL, seconds or ttl or ttl/2 (0,1,ttl/2,ttl; none to skip).",
    ),
    restart_runs: Optional[int] = typer.Option(None, "--restart-runs", help="failover: runs per restart delay (5)."),
    interval: Optional[float] = typer.Option(None, help="Feed poll interval in seconds (0.1; dbload 1)."),
    check_ttl: Optional[float] = typer.Option(None, "--check-ttl", help="failover: the nodes' Consul check TTL (3)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (stable keys)."),
) -> None:
    """Measure subsys on this machine, against a baseline in the same run (each bench starts and stops all it needs)."""
    from subsys.bench import run_bench
    from subsys.bench.report import render

    options = dict(
        changes=changes, subscribers=subscribers, rounds=rounds, client_procs=client_procs, event_loop=event_loop,
        clients=clients, topics=topics, window=window, batch_size=batch_size, kills=kills, kinds=kinds,
        fast_failover=fast_failover, restart_after=restart_after, restart_runs=restart_runs, interval=interval,
        check_ttl=check_ttl,
    )  # fmt: skip
    async def bench_until_stopped() -> dict:
        # SIGTERM unwinds like Ctrl-C (the main task is cancelled): every `async with` stops what it
        # started (nodes, PostgreSQL, Consul, baseline and client processes) instead of dying with them up
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_bench(what, **options)

    try:
        result = asyncio.run(bench_until_stopped())
    except (KeyboardInterrupt, asyncio.CancelledError):  # its processes were stopped as its blocks unwound
        err.print("bench interrupted")
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(result))
    else:
        # a pipe or a file gets wide tables rather than truncated columns
        render(result, Console() if sys.stdout.isatty() else Console(width=160))
    if "error" in result:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
