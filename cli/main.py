"""The ``subsys`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from subsys.config import Settings, load_settings
from subsys.core import admin as api
from subsys.core.errors import ConfigError, SubsysError

__all__ = ["app", "main"]

app = typer.Typer(
    name="subsys",
    help="Live WebSocket subscriptions for databases that cannot push changes.",
    no_args_is_help=True,
    add_completion=True,  # `subsys --install-completion`: commands, options, and the choices below
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
    from subsys.web.app import run_node
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
        run_node(settings)
    except ImportError as exc:  # node.event_loop = "uvloop" without uvloop installed
        err.print(f"[bold red]config error:[/] node.event_loop: {exc} (install it: pip install 'subsys[fast]')")
        raise typer.Exit(2) from None
    except (OSError, SubsysError) as exc:  # port taken, Consul refused us (ACL), ...
        err.print(f"[bold red]cannot serve:[/] {exc}")
        raise typer.Exit(1) from None


@app.command()
def sub(
    topic: str = typer.Argument(..., help="Topic, e.g. orders:1"),
    urls: Optional[List[str]] = typer.Option(
        None, "--url", "-u", show_default=False,
        help="A node (ws://host:port/ws or http://host:port); repeat it, or separate with commas, to name more: "
             "when a connection is lost the next one is tried. Default: $SUBSYS_URL, else ws://127.0.0.1:8080/ws.",
    ),  # fmt: skip
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line."),
    count: int = typer.Option(0, help="Exit after this many messages (0: run until Ctrl-C)."),
    reconnect: bool = typer.Option(True, "--reconnect/--no-reconnect",
                                   help="On a lost connection, go on through the next node (or exit 1)."),
) -> None:
    """Subscribe to a topic and print its snapshot and diffs as they arrive (through another node when one goes away)."""
    from subsys.cli.admin import admin_urls
    from subsys.cli.sub import run_sub

    try:
        code = asyncio.run(run_sub(topic, urls=admin_urls(urls), as_json=as_json, count=count, reconnect=reconnect))
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
    topics: Optional[int] = typer.Option(None, help="dbload: subscribed topics (1000); latency: topics the node polls (1); consul-writes: (100)."),
    window: Optional[float] = typer.Option(None, help="dbload (30), consul-writes (60): seconds counted."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="dbload: database.batch_size for the merged-polling phase (100)."
    ),
    kills: Optional[int] = typer.Option(None, help="failover: faults of each kind, per fast_failover mode (20)."),
    kinds: Optional[str] = typer.Option(None, help="failover: fault kinds, of kill,kill-restart,stop,forced (all)."),
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
    lock_delay: Optional[float] = typer.Option(
        None, "--lock-delay", help="failover: the nodes' consul.lock_delay, seconds (0.5; 0 measures its cost)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (stable keys)."),
) -> None:
    """Measure subsys on this machine, against a baseline in the same run (each bench starts and stops all it needs)."""
    from subsys.bench import run_bench
    from subsys.bench.report import render

    options = dict(
        changes=changes, subscribers=subscribers, rounds=rounds, client_procs=client_procs, event_loop=event_loop,
        clients=clients, topics=topics, window=window, batch_size=batch_size, kills=kills, kinds=kinds,
        fast_failover=fast_failover, restart_after=restart_after, restart_runs=restart_runs, interval=interval,
        check_ttl=check_ttl, lock_delay=lock_delay,
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


@app.command()
def chaos(
    rounds: int = typer.Option(10, help="Rounds: one fault each, then recovery checks."),
    seed: int = typer.Option(1, help="Seed of every random choice (faults' order and targets, clients, writer)."),
    faults: Optional[str] = typer.Option(None, help="Comma list of fault kinds (default: all that fit the cluster)."),
    nodes: int = typer.Option(3, help="subsys nodes."),
    clients: int = typer.Option(45, help="WebSocket clients, spread over the nodes."),
    topics: int = typer.Option(12, help="Topics the clients subscribe to (4 each)."),
    consul_servers: int = typer.Option(1, "--consul-servers", help="1, or 3 (with a client agent per node)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep logs and Consul data here (default: a temp dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
) -> None:
    """Apply faults to a local cluster and check its guarantees; exit 1 on any violation."""
    from subsys.chaos.cli import run_chaos_command

    raise typer.Exit(run_chaos_command(rounds=rounds, seed=seed, faults=faults, nodes=nodes, clients=clients,
                                       topics=topics, consul_servers=consul_servers, workdir=workdir,
                                       as_json=as_json))  # fmt: skip


# -- operating a cluster: the admin API (docs/operations.md, "CLI") ---------------------------------------------------

# Where: --url (repeatable, tried in order) or $SUBSYS_URL (comma-separated). The token: $SUBSYS_TOKEN only,
# never an option, since a token on the command line is visible to every user in `ps`.
UrlOpt = typer.Option(None, "--url", "-u", show_default=False, metavar="URL",
                      help="A node's admin URL (http://host:port, ws://host:port/ws works too); repeat to add "
                           "fallbacks. Default: $SUBSYS_URL (comma-separated), else http://127.0.0.1:8080.")  # fmt: skip
JsonOpt = typer.Option(False, "--json", help="Print the API's answer as JSON (stable field names) instead of a table.")
YesOpt = typer.Option(False, "--yes", "-y", help="Do it without asking (required when stdin is not a terminal).")

TopicState = Enum("TopicState", {s: s for s in api.TOPIC_STATES}, type=str)  # type: ignore[misc]
TopicSort = Enum("TopicSort", {s: s for s in api.TOPIC_SORT_KEYS}, type=str)  # type: ignore[misc]


def _admin(url: Optional[List[str]], as_json: bool, body) -> None:
    from subsys.cli.admin import run

    run(url, as_json, body)


@app.command()
def cluster(url: Optional[List[str]] = UrlOpt, as_json: bool = JsonOpt) -> None:
    """The cluster at a glance: nodes, topics (owned, unowned, failing), clients."""
    from subsys.cli import admin

    _admin(url, as_json, admin.cluster)


@app.command()
def nodes(url: Optional[List[str]] = UrlOpt, as_json: bool = JsonOpt) -> None:
    """Every node: health (ok, draining, unreachable), owned and followed topics, clients, uptime."""
    from subsys.cli import admin

    _admin(url, as_json, admin.nodes)


@app.command()
def topics(
    feed: Optional[str] = typer.Option(None, help="Only this feed's topics."),
    node: Optional[str] = typer.Option(None, help="Owned by, or with subscribers on, this node."),
    owner: Optional[str] = typer.Option(None, help="Owned by this node."),
    state: Optional[TopicState] = typer.Option(None, help="Only topics in this state."),
    text: Optional[str] = typer.Option(None, "--q", "--text", help="Topics whose name contains this."),
    sort: TopicSort = typer.Option("topic", help="Sort by this column."),
    desc: bool = typer.Option(False, "--desc", help="Sort descending."),
    limit: int = typer.Option(100, min=1, max=5000, help="At most this many topics."),
    offset: int = typer.Option(0, min=0, help="Skip this many first."),
    every: bool = typer.Option(False, "--all", help="Every matching topic (pages through; ignores --limit/--offset)."),
    url: Optional[List[str]] = UrlOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Topics across the cluster, filtered, sorted and paged like the API's GET /topics."""
    from subsys.cli import admin

    filters = dict(feed=feed, node=node, owner=owner, state=state.value if state else None, q=text,
                   sort=sort.value, order="desc" if desc else "asc")  # fmt: skip
    _admin(url, as_json, lambda ctx, client: admin.topics(ctx, client, every=every, offset=offset, limit=limit,
                                                          **filters))  # fmt: skip


@app.command()
def topic(
    name: str = typer.Argument(..., metavar="TOPIC", help="e.g. orders:42"),
    url: Optional[List[str]] = UrlOpt,
    as_json: bool = JsonOpt,
) -> None:
    """One topic: owner, epoch, polling, the nodes serving it, and its ownership history."""
    from subsys.cli import admin

    _admin(url, as_json, lambda ctx, client: admin.topic(ctx, client, name))


@app.command()
def failover(
    name: str = typer.Argument(..., metavar="TOPIC", help="e.g. orders:42"),
    to: Optional[str] = typer.Option(None, "--to", help="The node to take it (default: the cluster picks)."),
    yes: bool = YesOpt,
    url: Optional[List[str]] = UrlOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Force a topic's failover: its owner stops polling, another node (or --to) takes it at a new epoch."""
    from subsys.cli import actions

    _admin(url, as_json, lambda ctx, client: actions.failover(ctx, client, name, to=to, yes=yes))


@app.command()
def drain(
    node: str = typer.Argument(..., metavar="NODE"),
    yes: bool = YesOpt,
    url: Optional[List[str]] = UrlOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Drain a node: its topics move to other nodes and it refuses new clients. Undo with `subsys undrain`."""
    from subsys.cli import actions

    _admin(url, as_json, lambda ctx, client: actions.drain(ctx, client, node, yes=yes))


@app.command()
def undrain(
    node: str = typer.Argument(..., metavar="NODE"),
    yes: bool = YesOpt,
    url: Optional[List[str]] = UrlOpt,
    as_json: bool = JsonOpt,
) -> None:
    """End a node's drain: it takes topics and clients again."""
    from subsys.cli import actions

    _admin(url, as_json, lambda ctx, client: actions.undrain(ctx, client, node, yes=yes))


@app.command()
def zombies(
    reap: bool = typer.Option(False, "--reap", help="Reap them: say every action and ask (unless --yes), carry "
                                                    "them out with a progress line, then say what was done, what "
                                                    "failed and why."),  # fmt: skip
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what --reap would do; change nothing."),
    kind: Optional[str] = typer.Option(None, "--kind", metavar="KIND",
                                       help="Only this kind (orphan_poller, duplicate_poller, stuck_owner, "
                                            "idle_owner, stale_presence, dead_session, leaked_registration, "
                                            "released_key)."),  # fmt: skip
    topic: Optional[str] = typer.Option(None, "--topic", metavar="TOPIC", help="Only zombies of this topic."),
    node: Optional[str] = typer.Option(None, "--node", metavar="NODE", help="Only zombies involving this node."),
    ids: Optional[List[str]] = typer.Option(None, "--id", metavar="ID",
                                            help="Only this zombie (its id, KIND:SUBJECT, as --json shows it); "
                                                 "repeatable."),  # fmt: skip
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Under each zombie: its evidence and its actions."),
    yes: bool = YesOpt,
    url: Optional[List[str]] = UrlOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Zombies: what disagrees with the source of truth (a poller nobody owns, a key of a dead node, ...).

    Exit 0: none; 9: some (also for --dry-run); after --reap: 0, or 10 if some action failed.
    """
    from subsys.cli import zombies as command

    _admin(url, as_json, lambda ctx, client: command.zombies(
        ctx, client, kind=kind, topic=topic, node=node, ids=ids, verbose=verbose, reap=reap, dry_run=dry_run,
        yes=yes))  # fmt: skip


@app.command()
def console(
    url: Optional[List[str]] = UrlOpt,
    read_only: bool = typer.Option(False, "--read-only", help="Offer no actions, even with an operator token."),
) -> None:
    """The interactive operator console (Textual), on the same URLs and token as the other commands."""
    from subsys.cli.admin import TOKEN_ENV, ExitCode, admin_urls

    try:
        # Imported here: the console pulls in Textual, which the other commands do not need.
        from subsys.console import run_console
    except ImportError as exc:
        err.print(f"[bold red]the console is not available in this installation:[/] {exc}")
        raise typer.Exit(ExitCode.ERROR) from None
    code = run_console(admin_urls(url), os.environ.get(TOKEN_ENV, "").strip(), read_only)
    raise typer.Exit(code or 0)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
