"""The demo data behind ``subsys dev``: schema, seed rows, feeds and a writer.

Private to :mod:`subsys.dev`. The schema is small on purpose:

* ``customers(id, name)``, ids 1..5;
* ``orders(id, customer_id, status, amount numeric, updated_at timestamptz)``:
  orders move ``new -> paid -> shipped -> delivered`` and delivered ones are
  deleted a couple of seconds later, so one topic shows inserts, updates and
  deletes;
* ``warehouses(id, city)`` and ``stock(warehouse, sku, qty, updated_at)``.

Feeds (all parameters bound as ``$1``, never interpolated):

===============  ==============================  ============  =========
feed             topics                          param type    key
===============  ==============================  ============  =========
``orders``       ``orders:1`` .. ``orders:5``     int           id
``stock``        ``stock:ams|ber|lis``            text          sku
``by_status``    ``by_status:new|paid|...``       text          id
===============  ==============================  ============  =========

Everything is idempotent: running ``subsys dev`` again on the same data
directory reuses the tables and rows that are there.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import asyncpg

from subsys.testing.nodes import to_toml, write_toml

__all__ = [
    "DEMO_DATABASE",
    "CUSTOMERS",
    "WAREHOUSES",
    "STATUSES",
    "FEEDS_HELP",
    "ensure_database",
    "ensure_schema",
    "prepare",
    "config",
    "config_toml",
    "write_config",
    "DemoWriter",
]

DEMO_DATABASE = "subsys_dev"
CUSTOMERS = {1: "Ada", 2: "Grace", 3: "Edsger", 4: "Barbara", 5: "Ken"}
WAREHOUSES = {"ams": "Amsterdam", "ber": "Berlin", "lis": "Lisbon"}
SKUS = ("apples", "bread", "cheese", "dates", "eggs", "flour")
STATUSES = ("new", "paid", "shipped", "delivered")
MAX_ORDERS_PER_CUSTOMER = 8
DELIVERED_KEEP_SECONDS = 2.0

FEEDS_HELP = {
    "orders": "orders:1 .. orders:5  (a customer's orders)",
    "stock": "stock:ams | stock:ber | stock:lis  (a warehouse's stock)",
    "by_status": "by_status:new | paid | shipped | delivered  (orders in one state)",
}

_SCHEMA = """
create table if not exists customers (
    id   int primary key,
    name text not null
);
create table if not exists orders (
    id          bigserial primary key,
    customer_id int not null references customers (id),
    status      text not null check (status in ('new', 'paid', 'shipped', 'delivered')),
    amount      numeric(10, 2) not null,
    updated_at  timestamptz not null default now()
);
create index if not exists orders_customer_id on orders (customer_id);
create index if not exists orders_status on orders (status);
create table if not exists warehouses (
    id   text primary key,
    city text not null
);
create table if not exists stock (
    warehouse  text not null references warehouses (id),
    sku        text not null,
    qty        int not null check (qty >= 0),
    updated_at timestamptz not null default now(),
    primary key (warehouse, sku)
);
"""


async def ensure_database(admin_url: str, name: str = DEMO_DATABASE) -> None:
    """Create database ``name`` unless it exists (``admin_url`` points at another database)."""
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", name)
        if not exists:
            # An identifier cannot be bound; ``name`` is our own constant, quoted anyway.
            await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()


async def ensure_schema(url: str) -> None:
    """Create the demo tables and seed rows (idempotent)."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            # Serialise concurrent setups of the same database.
            await conn.execute("select pg_advisory_xact_lock(hashtext('subsys_dev_schema'))")
            await conn.execute(_SCHEMA)
            await conn.executemany(
                "insert into customers (id, name) values ($1, $2) on conflict (id) do nothing",
                list(CUSTOMERS.items()),
            )
            await conn.executemany(
                "insert into warehouses (id, city) values ($1, $2) on conflict (id) do nothing",
                list(WAREHOUSES.items()),
            )
            rng = random.Random(7)
            await conn.executemany(
                "insert into stock (warehouse, sku, qty) values ($1, $2, $3) on conflict do nothing",
                [(w, sku, rng.randint(5, 60)) for w in WAREHOUSES for sku in SKUS],
            )
            for customer in CUSTOMERS:
                count = await conn.fetchval("select count(*) from orders where customer_id = $1", customer)
                for _ in range(max(0, 2 - count)):
                    await conn.execute(
                        "insert into orders (customer_id, status, amount) values ($1, 'new', $2)",
                        customer,
                        _amount(rng),
                    )
    finally:
        await conn.close()


async def prepare(admin_url: str, url: str) -> None:
    """The demo database (``admin_url`` points at another one of the server), its tables and rows."""
    await ensure_database(admin_url)
    await ensure_schema(url)


def config(*, interval: float, grace_period: float = 2.0) -> dict[str, Any]:
    """The demo's ``subsys.toml`` as a dict (no secrets: those go in the environment)."""
    feeds = {  # name: (sql, key, param type)
        "orders": (
            "select id, customer_id, status, amount, updated_at from orders where customer_id = $1 order by id",
            "id",
            "int",
        ),
        "stock": ("select sku, qty, updated_at from stock where warehouse = $1 order by sku", "sku", "text"),
        "by_status": (
            "select id, customer_id, amount, updated_at from orders where status = $1 order by id",
            "id",
            "text",
        ),
    }
    return {
        "node": {"host": "127.0.0.1", "grace_period": float(grace_period)},
        "feeds": {
            name: {"sql": sql, "key": key, "param": param, "interval": float(interval)}
            for name, (sql, key, param) in feeds.items()
        },
    }


_HEADER = """Generated by `subsys dev`; regenerated on every run.
The database URL and any secret come from the environment, never from here."""


def config_toml(*, interval: float, grace_period: float = 2.0) -> str:
    return to_toml(config(interval=interval, grace_period=grace_period), header=_HEADER)


def write_config(path: Path, *, interval: float) -> Path:
    return write_toml(path, config(interval=interval), header=_HEADER)


def _amount(rng: random.Random) -> Decimal:
    return Decimal(rng.randint(500, 25_000)) / 100


class DemoWriter:
    """Keeps the demo rows changing: one transaction per tick.

    Each tick, every customer gets one change (a new order, or an order
    advancing one status, sometimes an amount correction), delivered orders
    older than a couple of seconds are deleted, and a few stock levels move.
    Orders per customer stay bounded. Database errors are reported through
    ``report`` once per outage and retried; the writer never dies of them.
    """

    def __init__(
        self,
        url: str,
        *,
        tick: float = 0.5,
        seed: int | None = None,
        report: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.url = url
        self.tick = tick
        self.report = report
        self.rng = random.Random(seed)
        self.ticks = 0
        self.changes = 0

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        failing = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.url, timeout=5)
                    await self.step(conn)
                    if failing:
                        self.report("writer: database reachable again, writing")
                        failing = False
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
                    if not failing:
                        self.report(f"writer: {type(exc).__name__}: {exc} (retrying every second)")
                        failing = True
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(1.0)
                    continue
                await asyncio.sleep(max(0.0, self.tick - (loop.time() - started)))
        finally:
            if conn is not None:
                conn.terminate()

    async def step(self, conn: asyncpg.Connection) -> int:
        """One tick of changes; returns how many rows it changed."""
        rng = self.rng
        changed = 0
        async with conn.transaction():
            result = await conn.execute(
                "delete from orders where status = 'delivered' and updated_at < now() - make_interval(secs => $1)",
                DELIVERED_KEEP_SECONDS,
            )
            changed += int(result.split()[-1])
            for customer in CUSTOMERS:
                rows = await conn.fetch(
                    "select id, status from orders where customer_id = $1 order by id", customer
                )
                open_orders = [r for r in rows if r["status"] != "delivered"]
                roll = rng.random()
                if len(rows) < MAX_ORDERS_PER_CUSTOMER and (len(open_orders) < 2 or roll < 0.3):
                    await conn.execute(
                        "insert into orders (customer_id, status, amount) values ($1, 'new', $2)",
                        customer,
                        _amount(rng),
                    )
                elif open_orders and roll > 0.9:
                    order = rng.choice(open_orders)
                    await conn.execute(
                        "update orders set amount = $2, updated_at = now() where id = $1", order["id"], _amount(rng)
                    )
                elif open_orders:
                    order = rng.choice(open_orders)
                    following = STATUSES[STATUSES.index(order["status"]) + 1]
                    await conn.execute(
                        "update orders set status = $2, updated_at = now() where id = $1", order["id"], following
                    )
                else:
                    continue
                changed += 1
            for _ in range(2):
                warehouse = rng.choice(list(WAREHOUSES))
                sku = rng.choice(SKUS)
                delta = rng.randint(-6, 8)
                await conn.execute(
                    "update stock set qty = case when qty + $3 < 0 then 40 else qty + $3 end, updated_at = now()"
                    " where warehouse = $1 and sku = $2",
                    warehouse,
                    sku,
                    delta,
                )
                changed += 1
        self.ticks += 1
        self.changes += changed
        return changed
