"""Optional dependencies: checked where a command needs them, so a missing one is one clear line.

The core install (worker, learner, topics, tail, model, config) stays light: plotting
(matplotlib) and the terminal views (rich) come with the extras of the commands that use
them (pyproject.toml: ``demo``, ``bench``, ``offline``). Those commands import them lazily and
call :func:`require` first, so a plain install fails with the extra to install, before any
work is done, instead of a ModuleNotFoundError at the end of a run.
"""
from __future__ import annotations

from importlib.util import find_spec

from streamagent.errors import MissingExtra


def missing(*modules: str) -> list[str]:
    """The top-level modules among ``modules`` that cannot be imported."""
    return [m for m in modules if find_spec(m.split(".")[0]) is None]


def require(extra: str, *modules: str, what: str) -> None:
    """Raise MissingExtra naming ``extra`` unless every one of ``modules`` can be imported."""
    absent = missing(*modules)
    if absent:
        raise MissingExtra(f"{what} needs {', '.join(absent)}, which the plain install leaves "
                           f"out: pip install 'streamagent[{extra}]'")
