"""Recipes: one TOML file per source with its hyperparameters, profiles and validated overrides.

A recipe is plain data. `load_recipe("dacon", profile="quick", overrides=["train.epochs=3"])` reads
`recipes/dacon.toml`, merges the profile's table over the base, applies the `--set` overrides and
validates the result against the base recipe (every key must exist there, every value must have the
base value's type) and against the task module's rules (allowed values, ranges).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# A rule returns an error message for a bad value, or None.
Rule = Callable[[Any], "str | None"]


class RecipeError(ValueError):
    """A recipe file, profile or override that cannot be used; the message names the key."""


def one_of(*choices: Any) -> Rule:
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}"


def positive(value: Any) -> str | None:
    values = value if isinstance(value, list) else [value]
    return None if all(v > 0 for v in values) else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def fraction(value: Any) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def load_recipe(
    name_or_path: str | os.PathLike,
    profile: str | None = None,
    overrides: Iterable[str] = (),
    rules: Mapping[str, Rule] | None = None,
) -> dict[str, Any]:
    """Read, merge and validate a recipe.

    Args:
        name_or_path: a recipe name ("dacon" → recipes/dacon.toml) or a path to a TOML file.
        profile: name of a table under `[profiles]` merged over the base recipe.
        overrides: "section.key=value" strings; the value is parsed as TOML, else taken as a string.
        rules: dotted key → rule, checked after merging.

    Returns:
        The resolved recipe (profiles removed, `profile` recorded under `run.profile`).
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
        raise RecipeError(f"recipe {str(name_or_path)!r} not found at {path}; available: {', '.join(available)}")
    try:
        base = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML ({error})") from error

    profiles = base.pop("profiles", {})
    recipe = copy.deepcopy(base)
    if profile is not None:
        if profile not in profiles:
            raise RecipeError(f"{path}: unknown profile {profile!r}; available: {', '.join(sorted(profiles))}")
        _merge(recipe, profiles[profile], base, where=f"profile {profile!r}")
    for override in overrides:
        key, value = parse_override(override)
        _merge(recipe, _nest(key, value), base, where=f"--set {override}")
    run = recipe.setdefault("run", {})
    if profile is not None or "profile" not in run:  # a resolved recipe (a run's recipe.toml) keeps its own
        run["profile"] = profile or "full"
    for key, rule in (rules or {}).items():
        message = rule(get(recipe, key))
        if message:
            raise RecipeError(f"{key} = {get(recipe, key)!r}: {message}")
    return recipe


def parse_override(text: str) -> tuple[str, Any]:
    """Split "a.b=value" and parse the value as TOML (`3`, `0.5`, `true`, `[1, 2]`, `"x"`), else as a string."""
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key or "." not in key:
        raise RecipeError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def get(recipe: Mapping[str, Any], dotted_key: str) -> Any:
    node: Any = recipe
    for part in dotted_key.split("."):
        node = node[part]
    return node


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-able data (recipes, feature parameters)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _nest(dotted_key: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted_key.split(".")):
        value = {part: value}
    return value


def _merge(target: dict, update: Mapping, schema: Mapping, where: str, prefix: str = "") -> None:
    """Merge `update` into `target`, refusing keys and types that the base recipe (`schema`) lacks."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(f"{prefix}{k}" for k in schema)
            raise RecipeError(f"{where}: unknown key {dotted!r}; known keys here: {known}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {dotted!r} is a section, not a value")
            _merge(target[key], value, expected, where, prefix=f"{dotted}.")
            continue
        target[key] = _coerce(value, expected, dotted, where)


def _coerce(value: Any, expected: Any, dotted: str, where: str) -> Any:
    if isinstance(expected, bool) or isinstance(value, bool):
        if type(value) is not type(expected):
            raise RecipeError(f"{where}: {dotted!r} must be {type(expected).__name__}, got {value!r}")
        return value
    if isinstance(expected, float) and isinstance(value, int):
        return float(value)
    if isinstance(expected, list) and isinstance(value, list):
        if expected and value:
            return [_coerce(item, expected[0], dotted, where) for item in value]
        return value
    if not isinstance(value, type(expected)):
        raise RecipeError(f"{where}: {dotted!r} must be {type(expected).__name__} like {expected!r}, got {value!r}")
    return value
