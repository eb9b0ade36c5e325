"""What a plain `pip install` gets: the wheel carries the topic schemas and decides outside the
repository; the core imports neither rich nor matplotlib; `streamagent --version`.

The installed test builds the wheel from a copy of the sources, installs it with --no-deps
into a fresh venv outside the repository and runs there from a temporary directory. That venv
borrows the dependencies already in this one (a .pth line, which adds the directory but does
not run the editable install's own .pth), so the package's files come only from the wheel
and nothing is downloaded. About ten seconds: not marked slow.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

import streamagent
from streamagent.core.contracts import SCHEMA_FILES

ROOT = Path(__file__).resolve().parents[2]


def _clean_env() -> dict:
    """No PYTHONPATH, no venv and no STREAMAGENT_* setting (STREAMAGENT_SCHEMAS_DIR above
    all) leaks in: the installed copy must find everything by itself."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("STREAMAGENT_", "PYTHON", "VIRTUAL_ENV"))}


def _run(*cmd, cwd: Path, input: bytes | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), input=input,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the venv's python, a working directory outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(ROOT)
    src = tmp / "src"  # a copy: building never writes build/ or *.egg-info into the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "streamagent", src / "streamagent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", dist, src, cwd=tmp)
    wheel = next(dist.glob("streamagent-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"streamagent/schemas/{f}" for f in SCHEMA_FILES.values()}
    assert shipped <= names, f"schemas missing from the wheel: {sorted(shipped - names)}"

    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp).strip())
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q",
         wheel, cwd=tmp)
    work = tmp / "cwd"
    work.mkdir()
    return py, work


# One user event of the contract (schemas/user-event.v1.json), a decision trigger by default.
DECIDE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import orjson
    import streamagent
    from streamagent.core.catalog import load_catalog
    from streamagent.core.contracts import BudgetShare, schemas_dir, validator
    from streamagent.core.engine import DecisionEngine, initial_model
    from streamagent.errors import InvalidMessage
    from streamagent.params import engine_params, shipped

    # the package and its schemas come from the venv, not from the repository
    assert Path(streamagent.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), \\
        streamagent.__file__
    assert str(schemas_dir()).startswith(str(Path(streamagent.__file__).parent)), schemas_dir()
    s = shipped()
    cat = load_catalog()
    eng = DecisionEngine(cat, engine_params(s, 1),
                         initial_model(cat, tuple(s.hidden_sizes), s.seed, s.q_heads))
    event = {"event_id": "e-1", "user_id": "u-42", "type": "add_to_cart",
             "ts": 1767225600000, "item_id": "sku-991", "price": 59.9}
    r = eng.step(orjson.dumps(event), b"u-42", None, BudgetShare(), 0, 0)
    assert r.decision is not None, "no decision on a trigger event"
    validator("decision-log")(r.decision.to_doc())
    try:  # and the schema is really enforced: no user_id is a contract breach
        eng.step(orjson.dumps({k: v for k, v in event.items() if k != "user_id"}), b"u-42",
                 None, BudgetShare(), 0, 1)
    except InvalidMessage as exc:
        print("rejected:", exc.reason)
    else:
        raise AssertionError("an event without user_id was accepted")
    print("decided:", r.decision.action)
""")


def test_the_installed_wheel_decides_outside_the_repository(installed):
    py, work = installed
    out = _run(py, "-c", DECIDE, cwd=work)
    assert "decided:" in out and "rejected:" in out


def test_the_installed_command_prints_its_version(installed):
    py, work = installed
    out = _run(py.parent / "streamagent", "--version", cwd=work)
    assert out.strip() == f"streamagent {streamagent.__version__}"


def test_version_comes_from_the_package_metadata(capsys):
    from streamagent.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"streamagent {streamagent.__version__}"


def test_version_without_metadata_falls_back_to_the_package(monkeypatch):
    import importlib.metadata as md

    from streamagent import cli

    def absent(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", absent)
    assert cli.version() == streamagent.__version__


def test_schemas_override_still_works(tmp_path, monkeypatch):
    from streamagent.core import contracts

    monkeypatch.setenv("STREAMAGENT_SCHEMAS_DIR", str(tmp_path))
    assert contracts.schemas_dir() == tmp_path
    monkeypatch.delenv("STREAMAGENT_SCHEMAS_DIR")
    assert (contracts.schemas_dir() / SCHEMA_FILES["user-event"]).is_file()


def test_the_top_level_schemas_is_the_package_copy():
    """One source of truth: schemas/ at the root is a symlink into the package."""
    link = ROOT / "schemas"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert link.resolve() == (ROOT / "streamagent" / "schemas").resolve()


# The light core: with rich and matplotlib unimportable, the product's commands still load,
# and the commands that need them say which extra to install.
NO_EXTRAS = textwrap.dedent("""
    import sys
    sys.modules["rich"] = None
    sys.modules["matplotlib"] = None
    import importlib
    for mod in ("streamagent.cli", "streamagent.stream.app", "streamagent.stream.learner",
                "streamagent.stream.worker", "streamagent.ops.tail", "streamagent.core.export",
                "streamagent.offline.evaluate", "streamagent.offline.train",
                "streamagent.sim.demo", "streamagent.bench.learning"):
        importlib.import_module(mod)
    from streamagent.cli import build_parser, main
    build_parser()
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("argv, extra", [
    (["demo"], "demo"),
    (["bench", "learning"], "bench"),
    (["evaluate", "--logs", "x.jsonl", "--policy", "never"], "offline"),
])
def test_without_the_extras_commands_name_the_extra(argv, extra, tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_EXTRAS, *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"pip install 'streamagent[{extra}]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
