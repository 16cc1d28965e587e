"""Recipes: Python functions that return a RunConfig.

``--recipe NAME`` picks a built-in recipe registered here with ``@recipe``; ``--recipe path/to/file.py:fn``
loads ``fn`` from a user file. ``--set section.field=value`` overrides are applied afterwards, type-checked
against the dataclass annotations, and re-validated.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from megatron_vr1.config.base import ConfigError, apply_override
from megatron_vr1.config.run import RunConfig

RecipeFn = Callable[[], RunConfig]
_RECIPES: dict[str, RecipeFn] = {}


def recipe(fn: RecipeFn) -> RecipeFn:
    """Register ``fn`` as a built-in recipe under its function name."""
    _RECIPES[fn.__name__] = fn
    return fn


def available_recipes() -> list[str]:
    _load_builtin()
    return sorted(_RECIPES)


def _load_builtin() -> None:
    import megatron_vr1.config.builtin_recipes  # noqa: F401  (registers on import)


def load_recipe(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve ``spec`` (a built-in name or ``file.py:fn``) and apply ``overrides`` in order."""
    _load_builtin()
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, fn_name = spec.split(":", 1)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--recipe {spec}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_vr1_recipe_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        fn = getattr(module, fn_name, None)
        if fn is None:
            raise ConfigError(f"--recipe {spec}: {path} has no function {fn_name!r}")
    else:
        fn = _RECIPES.get(spec)
        if fn is None:
            raise ConfigError(f"--recipe {spec}: unknown recipe; built-in recipes are {available_recipes()}, "
                              "or pass path/to/file.py:function")
    cfg = fn()
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"--recipe {spec}: the function returned {type(cfg).__name__}, expected a RunConfig")
    for assignment in overrides:
        cfg = apply_override(cfg, assignment)
    return cfg
