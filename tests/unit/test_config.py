"""Config validation: every error names the file, the key and what is wrong."""

from __future__ import annotations

import textwrap

import pytest

from subsys.config import Feed, load_settings
from subsys.core.errors import ConfigError

GOOD_FEED = """
[feeds.orders]
sql = "select id, status from orders where customer_id = $1"
key = "id"
param = "int"
interval = 0.5
"""


def write(tmp_path, text: str, name: str = "subsys.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path, *, env=None, overrides=None) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_settings(path, env=env or {}, overrides=overrides)
    return exc.value


def test_good_config(tmp_path):
    path = write(
        tmp_path,
        GOOD_FEED
        + """
[feeds.lines]
sql = "select order_id, n, sku from order_lines where order_id = $1;"
key = ["order_id", "n"]
max_rows = 500
statement_timeout = 2

[node]
port = 9001
node_id = "n1"
grace_period = 2.5

[database]
url = "postgresql://localhost/app"

[limits]
max_subscriptions = 7
""",
    )
    settings = load_settings(path, env={})
    assert settings.source == str(path)
    assert settings.node.port == 9001 and settings.node_id == "n1" and settings.node.grace_period == 2.5
    assert settings.advertise_url == "http://127.0.0.1:9001"
    assert settings.database.url == "postgresql://localhost/app"
    assert settings.limits.max_subscriptions == 7
    assert settings.limits.max_frame_bytes == 16_384  # default
    assert settings.feeds["orders"] == Feed(
        name="orders", sql="select id, status from orders where customer_id = $1", key=("id",), param="int",
        interval=0.5,
    )
    lines = settings.feeds["lines"]
    assert lines.key == ("order_id", "n") and lines.param == "text" and lines.max_rows == 500
    assert lines.statement_timeout == 2.0 and not lines.sql.endswith(";")
    assert not settings.uses_consul


def test_defaults_without_a_file():
    settings = load_settings(None, env={})
    assert settings.source == "<defaults>"
    assert settings.node.port == 8080 and settings.feeds == {}
    assert settings.node_id  # derived from the host name and port


@pytest.mark.parametrize(
    "text, key, what",
    [
        ("[node]\nbogus = 1\n", "node.bogus", "unknown key"),
        ("[nodes]\nport = 1\n", "", "unknown section"),
        ("node = 5\n", "node", "must be a table"),
        ('[node]\nport = "eighty"\n', "node.port", "expected int"),
        ("[node]\nport = 1.5\n", "node.port", "expected int"),
        ("[node]\nport = true\n", "node.port", "expected int"),
        ("[node]\nport = 70000\n", "node.port", "0-65535"),
        ('[node]\ngrace_period = "soon"\n', "node.grace_period", "expected float"),
        ("[node]\ngrace_period = -1\n", "node.grace_period", ">= 0"),
        ('[node]\nlog_format = "xml"\n', "node.log_format", "human"),
        ('[node]\nnode_id = "bad id!"\n', "node.node_id", "letters"),
        ("[database]\nurl = [1]\n", "database.url", "expected str"),
        ("[database]\nmax_pool = 0\n", "database.max_pool", ">= min_pool"),
        ('[database]\nurl = "host=db user=app password=pw"\n', "database.url", "postgresql://"),
        ('[database]\nurl = "mysql://app:pw@db/app"\n', "database.url", "postgresql://"),
        ("[limits]\nmax_frame_bytes = 10\n", "limits.max_frame_bytes", ">= 256"),
        ("[limits]\nsend_queue = 2\n", "limits.send_queue", ">= 8"),
        ("[consul]\ncheck_ttl = 1\n", "consul.check_ttl", ">= 2"),
        ("[feeds.orders]\nkey = \"id\"\n", "feeds.orders.sql", "required"),
        ('[feeds.orders]\nsql = ""\nkey = "id"\n', "feeds.orders.sql", "required"),
        ('[feeds.orders]\nsql = "select 1"\nkey = "id"\n', "feeds.orders.sql", "$1"),
        ('[feeds.orders]\nsql = "select * from t where a = $1 and b = $2"\nkey = "id"\n', "feeds.orders.sql", "only"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\n', "feeds.orders.key", "required"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = []\n', "feeds.orders.key", "required"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = [1]\n', "feeds.orders.key", "required"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = "id"\nparam = "float"\n', "feeds.orders.param",
         "one of"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = "id"\ninterval = "fast"\n',
         "feeds.orders.interval", "expected float"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = "id"\ninterval = 0\n',
         "feeds.orders.interval", "between"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = "id"\nmax_rows = 0\n',
         "feeds.orders.max_rows", "between"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = "id"\nstatement_timeout = -1\n',
         "feeds.orders.statement_timeout", "between"),
        ('[feeds.orders]\nsql = "select * from t where a = $1"\nkey = "id"\nkeys = "id"\n', "feeds.orders",
         "unknown key"),
        ('[feeds.Orders]\nsql = "select * from t where a = $1"\nkey = "id"\n', "feeds.Orders", "feed name"),
        ('[feeds]\norders = "select 1"\n', "feeds.orders", "must be a table"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, key, what):
    path = write(tmp_path, text)
    error = config_error(path)
    assert error.source == str(path)
    assert error.key == key
    message = str(error)
    assert message.startswith(str(path)), message
    if key:
        assert f": {key}: " in message, message
    assert what in message, message


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.toml"
    error = config_error(missing)
    assert str(missing) in str(error) and "not found" in str(error)
    broken = write(tmp_path, "[node\nport = 1\n")
    error = config_error(broken)
    assert str(broken) in str(error) and "TOML" in str(error)


def test_config_path_from_env(tmp_path):
    path = write(tmp_path, GOOD_FEED)
    settings = load_settings(None, env={"SUBSYS_CONFIG": str(path)})
    assert settings.source == str(path) and "orders" in settings.feeds


def test_env_overrides_file_and_flags_override_env(tmp_path):
    path = write(tmp_path, GOOD_FEED + '\n[node]\nport = 9001\nhost = "0.0.0.0"\n[database]\nurl = "postgresql://file/db"\n')
    env = {
        "DATABASE_URL": "postgresql://env/db",
        "SUBSYS_PORT": "9123",
        "SUBSYS_NODE_ID": "from-env",
        "SUBSYS_GRACE_PERIOD": "0.5",
        "SUBSYS_LOG_FORMAT": "json",
        "CONSUL_HTTP_ADDR": "http://127.0.0.1:8500",
        "SUBSYS_CONSUL_PREFIX": "team",
        "SUBSYS_CLUSTER_SECRET": "s",
    }
    settings = load_settings(path, env=env)
    assert settings.database.url == "postgresql://env/db"
    assert settings.node.port == 9123  # coerced from the string
    assert settings.node.host == "0.0.0.0"  # not overridden: from the file
    assert settings.node_id == "from-env" and settings.node.grace_period == 0.5
    assert settings.node.log_format == "json"
    assert settings.uses_consul and settings.consul.prefix == "team/"
    settings = load_settings(path, env=env, overrides={"node": {"port": 7000, "node_id": None}})
    assert settings.node.port == 7000  # the flag wins
    assert settings.node_id == "from-env"  # None means "flag not given"


def test_a_cluster_needs_the_peer_link_secret(tmp_path):
    path = write(tmp_path, GOOD_FEED)
    error = config_error(path, env={"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500"})
    assert error.key == "SUBSYS_CLUSTER_SECRET" and str(path) in str(error)


def test_bad_env_override_names_the_variable(tmp_path):
    path = write(tmp_path, GOOD_FEED)
    error = config_error(path, env={"SUBSYS_PORT": "eighty"})
    assert error.key == "SUBSYS_PORT" and str(path) in str(error) and "expected int" in str(error)
    error = config_error(path, overrides={"node": {"port": "x"}})
    assert error.key == "--port"


def test_secrets_never_in_repr(tmp_path):
    path = write(
        tmp_path,
        GOOD_FEED
        + """
[secrets]
cluster_secret = "file-cluster-secret-1"
admin_token = "file-admin-token-2"

[database]
url = "postgresql://app:db-password-3@db.example/app"
""",
    )
    settings = load_settings(path, env={"CONSUL_HTTP_TOKEN": "env-consul-token-4"})
    assert settings.cluster_secret == "file-cluster-secret-1"
    assert settings.admin_token == "file-admin-token-2"
    assert settings.consul_token == "env-consul-token-4"
    assert settings.database.url == "postgresql://app:db-password-3@db.example/app"
    error = config_error(path, env={"DATABASE_URL": "mysql://app:db-password-7@db/app"})
    assert "db-password-7" not in str(error)
    for text in (repr(settings), str(settings), repr(settings.database)):
        for secret in ("file-cluster-secret-1", "file-admin-token-2", "env-consul-token-4", "db-password-3"):
            assert secret not in text, f"{secret} leaks into {text}"
    env_settings = load_settings(path, env={"SUBSYS_CLUSTER_SECRET": "env-secret-5", "SUBSYS_ADMIN_TOKEN": "tok-6"})
    assert env_settings.cluster_secret == "env-secret-5" and env_settings.admin_token == "tok-6"
    assert "env-secret-5" not in repr(env_settings) and "tok-6" not in repr(env_settings)


def test_the_configuration_page_documents_every_key() -> None:
    """docs/configuration.md lists every key of every section (and every secret)."""
    import dataclasses
    from pathlib import Path

    from subsys.config import ConsulConfig, DatabaseConfig, LimitsConfig, NodeConfig, Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [
        f"{section}.{f.name}"
        for section, cls in (("node", NodeConfig), ("database", DatabaseConfig), ("limits", LimitsConfig),
                             ("consul", ConsulConfig))  # fmt: skip
        for f in dataclasses.fields(cls)
        if f"| `{f.name}` |" not in doc
    ]
    missing += [f"secrets.{f.name}" for f in dataclasses.fields(Settings) if f.name.endswith(("_secret", "_token"))
                and f"| `{f.name}` |" not in doc]  # fmt: skip
    assert not missing, f"undocumented keys: {missing}"
