"""Process-wide settings the package makes on import."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.cli import main


def test_jemalloc_decay_is_set_before_polars_loads_and_user_value_wins() -> None:
    probe = ("import os, pipeline, polars; print(os.environ['_RJEM_MALLOC_CONF'])")
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.endswith(",dirty_decay_ms:2000,muzzy_decay_ms:0")  # after polars': it wins
    env["_RJEM_MALLOC_CONF"] = "dirty_decay_ms:500"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.endswith(",dirty_decay_ms:500") and "muzzy_decay_ms:0" not in out


# --- What `pip install .` ships: the wheel, built once from a copy of the sources ---

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Build the wheel (no deps) from a copy, so the checkout gets no build/ or egg-info."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pipeline", "schemas", "localdev"):  # localdev too: it must be left out
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (path,) = out.glob("audience_pipeline-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_runtime_and_schemas_but_no_local_dev_servers(
    wheel: zipfile.ZipFile,
) -> None:
    names = set(wheel.namelist())
    modules = {n for n in names if n.endswith(".py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    missing = source - modules
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"
    assert not [n for n in modules if not n.startswith("pipeline/")]
    assert not [n for n in names if "localdev" in n or "servers" in n or "moto" in n]
    schemas = {f"pipeline/schemas/{p.name}" for p in (ROOT / "schemas").glob("*.json")}
    assert "pipeline/schemas/config.schema.json" in schemas and len(schemas) >= 4
    assert schemas <= names


def test_wheel_requires_no_moto_or_flask_without_an_extra(wheel: zipfile.ZipFile) -> None:
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("polars") for r in runtime)
    assert not [r for r in runtime if re.match(r"(moto|flask|pytest)\b", r, re.I)]
    assert [r for r in requires if r.startswith("moto") and 'extra == "demo"' in r]
    assert [r for r in requires if r.startswith("moto") and 'extra == "dev"' in r]


@pytest.mark.parametrize("command", [["demo"], ["generate", "--output", "x"]])
def test_demo_and_generate_outside_the_checkout_fail_in_one_line(
    command: list[str], tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *command], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == (f"error: {command[0]} needs the repository checkout and the demo "
                           "extra: make demo\n")
    assert not list(tmp_path.iterdir())


def _pyproject_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_version_from_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"audience-pipeline {_pyproject_version()}\n"


def test_version_from_pyproject_when_not_installed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", not_installed)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"audience-pipeline {_pyproject_version()}\n"


def test_ci_runs_the_readme_test_command_which_lints_first() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]
    assert "make test " in (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    (test_rule,) = re.findall(r"^test:(.*)$", makefile, re.M)
    assert test_rule.split()[0] == "lint"  # lint before the suite
    lint_recipe = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check" in lint_recipe and "mypy" in lint_recipe
