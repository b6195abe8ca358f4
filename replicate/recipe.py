"""Recipes: one TOML file per source with its hyperparameters, profiles and validated overrides.

A recipe is plain data. `load_recipe("dacon", profile="quick", overrides=["train.epochs=3"])` reads
`recipes/dacon.toml` over the engine's defaults (`ENGINE_DEFAULTS`: the options every recipe has, such as
`train.precision` or `run.cache_dir`, declared here once), merges the profile's table over the base,
applies the `--set` overrides and validates the result against the base recipe (every key must exist there,
every value must have the base value's type), against the rules every recipe shares (`check_common`: finite
numbers, the engine's `train.*`, `ensemble.*` and `run.*` keys, feature sizes) and against the task's rules
(allowed values, ranges). A recipe file of one's own (`--recipe my.toml`) must have the package recipe's keys
(the engine's defaults aside).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
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


# An optimizer step moves a weight by about the learning rate (Adam and its kin: lr · m / √v ≈ ±lr) or by
# lr × its gradient (SGD). The sources train at 2e-4 to 0.01; around 1 these networks already diverge, and
# the large-batch SGD recipes that scale the rate with the batch stay below 10. A rate above 10 is a typo or
# an overflow (1e30, inf) that trains NaN, so it is refused before anything runs.
LEARNING_RATE_LIMIT = 10.0
# Seeds go to `keras.utils.set_random_seed`, which seeds numpy's legacy generator: 0 <= seed < 2**32.
SEED_LIMIT = 2**32
# The task names a package module and a folder under `run.runs_dir`: a plain name, no path.
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def learning_rate(value: Any) -> str | None:
    return None if 0 < value <= LEARNING_RATE_LIMIT else f"must be in (0, {LEARNING_RATE_LIMIT:g}]"


def learning_rate_floor(value: Any) -> str | None:
    return None if 0 <= value <= LEARNING_RATE_LIMIT else f"must be in [0, {LEARNING_RATE_LIMIT:g}]"


def non_empty_text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


# The engine's options that are not the source's: every recipe has them, with these values unless its TOML (a
# profile, `--set`) says otherwise. How members share the hardware and where a run works.
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        "fused": 1,  # members trained side by side as one model (`replicate.fused`); 1 = one at a time
        "fused_layout": "auto",  # "grouped" (grouped convolutions: GPU), "copies" (CPU); auto picks by device
        "precision": "float32",  # the sources'; "mixed_bfloat16", "mixed_float16" (GPU)
        "distribute": "none",  # one device; "mirrored": every GPU of the machine (`train.distribution_scope`)
    },
    "run": {
        "cache_dir": ".cache/features",  # feature caches, relative to the working directory
        "runs_dir": "runs",  # run folders: runs/<task>/<profile>-<hash>/
        "workers": 0,  # feature-extraction threads; 0 = all cores
        # Where the members train (`train.train_ensemble`): "local", one after another in this process, or
        # "ray", each member (or fused group) as a Ray task (`replicate.ray_executor`).
        "executor": "local",
        "ray_address": "local",  # "local" starts Ray here, "auto" joins the running cluster, or host:port
        "cpus_per_member": 1.0,  # CPU cores Ray reserves per member (its TensorFlow threads)
        "gpus_per_member": 0.0,  # GPUs Ray reserves per member (a fraction shares one)
        "retries": 2,  # a member whose Ray worker failed starts again (from its last epoch) this often
        "ray_features": "files",  # workers map the cache files ("files") or read "object_store" copies
    },
}

# What `train.compile_model` builds by name: Keras's optimizers and losses, and the package's own for what
# Keras lacks (`replicate.optimizers.OPTIMIZERS`, `replicate.losses`).
OPTIMIZER_NAMES = ("Keras2Nadam", "Nadam", "Adam", "AdamW", "SGD", "RMSprop")
LOSS_NAMES = ("CategoricalCrossentropy", "CategoricalFocalCrossentropy", "KLDivergence", "DoubleSoftmaxCrossentropy")

# The engine's keys, checked for every recipe that has them (a task's rules may narrow them further).
ENGINE_RULES: dict[str, Rule] = {
    "train.epochs": positive,
    "train.batch_size": positive,
    "train.learning_rate": learning_rate,
    "train.weight_decay": non_negative,
    "train.optimizer": one_of(*OPTIMIZER_NAMES),
    "train.loss": one_of(*LOSS_NAMES),
    "train.fused": positive,
    "train.fused_layout": one_of("auto", "grouped", "copies"),
    "train.precision": one_of("float32", "mixed_bfloat16", "mixed_float16"),
    "train.distribute": one_of("none", "mirrored"),
    "ensemble.seeds": positive,
    "ensemble.first_seed": non_negative,
    "run.workers": non_negative,
    "run.cache_dir": non_empty_text,
    "run.runs_dir": non_empty_text,
    "run.executor": one_of("local", "ray"),
    "run.ray_address": non_empty_text,
    "run.cpus_per_member": positive,
    "run.gpus_per_member": non_negative,
    "run.retries": non_negative,
    "run.ray_features": one_of("files", "object_store"),
}

# Where and how the members are trained, not what: left out of the run folder's name (`runner.default_run_id`), so
# that the same command with another executor resumes the same run.
EXECUTION_KEYS = ("executor", "ray_address", "cpus_per_member", "gpus_per_member", "retries", "ray_features")


def load_recipe(
    name_or_path: str | os.PathLike,
    profile: str | None = None,
    overrides: Iterable[str] = (),
    rules: Mapping[str, Rule] | None = None,
    *,
    task: str | None = None,
) -> dict[str, Any]:
    """Read, merge and validate a recipe.

    Args:
        name_or_path: a recipe name ("dacon" → recipes/dacon.toml) or a path to a TOML file.
        profile: name of a table under `[profiles]` merged over the base recipe.
        overrides: "section.key=value" strings; the value is parsed as TOML, else taken as a string.
        rules: dotted key → rule, checked after merging (after `check_common`).
        task: the task that will run the recipe: its `task` value must be this, and a recipe file other than
            the package's `recipes/<task>.toml` must have exactly that file's keys, with the same types.

    Returns:
        The resolved recipe (profiles removed, `profile` recorded under `run.profile`).
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
        raise RecipeError(f"recipe {str(name_or_path)!r} not found at {path}; available: {', '.join(available)}")
    base = with_engine_defaults(_read(path))
    if task is not None:
        if base.get("task") != task:
            raise RecipeError(f"{path}: task = {base.get('task')!r}, but this command runs the {task!r} recipe")
        package_path = RECIPES_DIR / f"{task}.toml"
        if path.resolve() != package_path.resolve():
            base = _conform(base, with_engine_defaults(_read(package_path)), path, package_path)

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
    check_common(recipe, where=str(path))
    for key, rule in (rules or {}).items():
        message = rule(get(recipe, key))
        if message:
            raise RecipeError(f"{key} = {get(recipe, key)!r}: {message}")
    return recipe


def check_common(recipe: Mapping[str, Any], where: str = "recipe") -> None:
    """The checks every recipe gets, whatever its task.

    Every float is finite (TOML and `--set` accept `inf` and `nan`); the engine's keys (`ENGINE_RULES`) and
    every learning rate (a key named `learning_rate` or ending in `_lr`, in any section) are in range; the
    seeds fit a 32-bit seed; `features.n_mels` is at most the FFT bins of the smallest `features.n_fft`
    (more mel bands than bins leaves bands empty, and 100,000 of them were an out-of-memory kill, not an
    error); `task` is a plain name.

    Raises:
        RecipeError: naming the key, its value and the rule.
    """
    for key, value in _leaves(recipe):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{key} = {value!r}: must be a finite number")
        name = key.rsplit(".", 1)[-1]
        if name == "learning_rate" or name.endswith("_lr"):
            message = (learning_rate if name == "learning_rate" else learning_rate_floor)(value)
            if message:
                raise RecipeError(f"{key} = {value!r}: {message}")
    for key, rule in ENGINE_RULES.items():
        value = _lookup(recipe, key)
        if value is not _ABSENT and (message := rule(value)):
            raise RecipeError(f"{key} = {value!r}: {message}")
    first_seed, seeds = _lookup(recipe, "ensemble.first_seed"), _lookup(recipe, "ensemble.seeds")
    if _ABSENT not in (first_seed, seeds) and first_seed + seeds > SEED_LIMIT:
        raise RecipeError(
            f"ensemble.first_seed = {first_seed!r}: the seeds {first_seed}..{first_seed + seeds - 1} must be "
            f"below 2**32 = {SEED_LIMIT} (keras.utils.set_random_seed takes 32-bit seeds)"
        )
    n_mels, n_fft = _lookup(recipe, "features.n_mels"), _lookup(recipe, "features.n_fft")
    if _ABSENT not in (n_mels, n_fft) and isinstance(n_mels, int):
        smallest = min(n_fft) if isinstance(n_fft, list) and n_fft else n_fft
        if isinstance(smallest, int) and smallest > 0 and n_mels > smallest // 2 + 1:
            raise RecipeError(
                f"features.n_mels = {n_mels}: must be at most {smallest // 2 + 1}, the frequency bins of "
                f"features.n_fft {smallest} (more mel bands than bins are empty)"
            )
    task = recipe.get("task")
    if task is not None and not (isinstance(task, str) and TASK_NAME.match(task)):
        raise RecipeError(f"{where}: task = {task!r} must be a plain lower-case name such as 'dacon' (no path)")


def with_engine_defaults(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with every `ENGINE_DEFAULTS` key it lacks added, after its own keys (its values are kept)."""
    recipe = copy.deepcopy(dict(recipe))
    for section, defaults in ENGINE_DEFAULTS.items():
        table = recipe.setdefault(section, {})
        for key, value in defaults.items():
            table.setdefault(key, value)
    return recipe


def seeds_of(recipe: Mapping[str, Any]) -> list[int]:
    """The ensemble's seeds: `ensemble.seeds` consecutive integers from `ensemble.first_seed`."""
    first = recipe["ensemble"]["first_seed"]
    return list(range(first, first + recipe["ensemble"]["seeds"]))


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


_ABSENT = object()


def _lookup(recipe: Mapping[str, Any], dotted_key: str) -> Any:
    """The value at `dotted_key`, or `_ABSENT`."""
    node: Any = recipe
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _leaves(node: Any, key: str = ""):
    """(dotted key, value) of every scalar of a recipe; list items come under their list's key."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            yield from _leaves(value, f"{key}.{name}" if key else name)
    elif isinstance(node, list):
        for item in node:
            yield from _leaves(item, key)
    else:
        yield key, node


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML ({error})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error})") from error


def _conform(recipe: dict, package: dict, path: Path, package_path: Path) -> dict:
    """A recipe file of one's own checked against the package's recipe of its task: the same keys (its own
    profiles and a resolved recipe's `run.profile` aside), values of the same types (ints taken as floats)."""
    own = copy.deepcopy(recipe)
    profiles = own.pop("profiles", None)
    resolved_profile = own.get("run", {}).pop("profile", _ABSENT) if isinstance(own.get("run"), dict) else _ABSENT
    schema = {key: value for key, value in package.items() if key != "profiles"}
    missing = [key for key in _keys(schema) if _lookup(own, key) is _ABSENT]
    if missing:
        raise RecipeError(
            f"{path}: missing {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
            f"({len(missing)} key(s)); a recipe for {recipe['task']!r} needs every key of {package_path.name}"
        )
    conformed = copy.deepcopy(schema)
    _merge(conformed, own, schema, where=str(path))
    if profiles is not None:
        conformed["profiles"] = profiles
    if resolved_profile is not _ABSENT:
        conformed["run"]["profile"] = resolved_profile
    return conformed


def _keys(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a recipe, sections opened (a section's key is not listed, its values are)."""
    keys = []
    for key, value in schema.items():
        if isinstance(value, dict) and value:
            keys += _keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


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
