"""The layout's rules, checked: import contracts on the installed layout, and where Consul's keys live.

The import contracts (``[tool.importlinter]`` in pyproject.toml) are checked
against the package as pip installs it, where ``cli/`` and ``console/`` are
``subsys.cli`` and ``subsys.console``: that also proves the wheel layout
(package mapping, ``consul/`` as package data) is right.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME = ("core", "node", "coordinator", "web")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    # From a copy without build/ and *.egg-info: setuptools would ship a stale build/lib's files.
    source = tmp_path_factory.mktemp("source") / "subsys"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "node_modules"))  # fmt: skip
    target = tmp_path_factory.mktemp("installed")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return target


def test_installed_layout_has_no_generic_top_level_packages(installed: Path) -> None:
    tops = {
        p.name for p in installed.iterdir()
        if p.is_dir() and p.name != "bin" and not p.name.endswith((".dist-info", ".egg-info"))
    }  # fmt: skip
    assert tops == {"subsys"}, f"top-level packages installed: {sorted(tops)}"
    assert (installed / "subsys" / "cli" / "main.py").is_file()
    assert (installed / "subsys" / "console" / "__init__.py").is_file()
    assert (installed / "subsys" / "_consul" / "install.sh").is_file(), "consul/ ships as package data"


def test_the_installed_package_has_every_source_file(installed: Path) -> None:
    """What a plain (non-editable) install ships: every module and style sheet, and its entry points import."""
    homes = {"subsys": REPO / "subsys", "subsys/cli": REPO / "cli", "subsys/console": REPO / "console"}
    missing = []
    for home, source in homes.items():
        for path in [*source.rglob("*.py"), *source.rglob("*.tcss")]:
            relative = path.relative_to(source)
            if home == "subsys" and relative.parts[0] in ("cli", "console"):
                continue  # not in the repository's subsys/
            if not (installed / home / relative).is_file():
                missing.append(f"{home}/{relative}")
    assert not missing, f"not installed: {missing}"
    entry_points = "import subsys.web.app, subsys.cli.main, subsys.console.app, subsys.bench, subsys.chaos, subsys.dev"
    result = subprocess.run([sys.executable, "-c", entry_points], cwd=installed, env={**os.environ, "PYTHONPATH": str(installed)},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_import_contracts_hold(installed: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=installed, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower() or "0 broken" in result.stdout.lower(), result.stdout


def test_only_the_consul_package_knows_the_key_layout() -> None:
    """Nothing outside subsys/coordinator/consul/ builds Consul key names."""
    pattern = re.compile(r"""["'}](owners|presence|nodes)/""")
    consul_room = REPO / "subsys" / "coordinator" / "consul"
    offenders = []
    for path in [*REPO.glob("subsys/**/*.py"), *REPO.glob("cli/**/*.py"), *REPO.glob("console/**/*.py"),
                 *REPO.glob("tests/**/*.py")]:  # fmt: skip
        if consul_room in path.parents or path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_runtime_reads_no_private_module_of_another_room() -> None:
    """Rooms talk through public names: no ``from subsys.<room>._x import`` across rooms."""
    offenders = []
    for room in RUNTIME:
        for path in (REPO / "subsys" / room).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                match = re.match(r"\s*from subsys\.(\w+)\.(_\w+)", line)
                if match and match.group(1) != room:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_architecture_page_maps_every_module() -> None:
    """docs/architecture.md names every module of the package (and names none that is gone)."""
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    mapped = doc.split("```")[1]  # the map at the top of the page
    missing = []
    for path in sorted((REPO / "subsys").rglob("*.py")):
        if path.name == "__init__.py" and path.parent != REPO / "subsys":
            name = path.parent.name + "/"
        else:
            name = path.name
        if name not in mapped:
            missing.append(str(path.relative_to(REPO)))
    assert not missing, f"not in docs/architecture.md: {missing}"
    named = set(re.findall(r"\b([a-z_]+\.py)\b", mapped))
    existing = {p.name for folder in ("subsys", "cli", "console") for p in (REPO / folder).rglob("*.py")}
    assert named <= existing, f"docs/architecture.md names modules that do not exist: {sorted(named - existing)}"
