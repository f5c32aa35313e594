"""Where our recipes and their packaged configs live, and how a recipe reads its config.

`RECIPES` is the single registry the CLI needs (design section 4): recipe module names mapped to
the names of their packaged YAML configs. A recipe is a top-level module installed from
`recipes/` (found with `importlib.util.find_spec`); a config is a YAML file of the package
`povid.recipe_configs` (found with `importlib.resources`).

`tune run NAME --config CFG` hands CFG verbatim to our recipes when CFG is not one of torchtune's
own configs, so recipes decorate their main with `parse` (not torchtune's `config.parse`) to turn
a packaged config name into a file.

torchtune is imported lazily: importing it takes seconds, and `povid ls` / `povid cp` only need
the registry.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.resources
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONFIG_PACKAGE = "povid.recipe_configs"
CONFIG_SUFFIX = ".yaml"

# Recipe module name -> packaged config names (file names in recipe_configs/ without ".yaml").
# Adding a recipe is one line here, plus its module in pyproject's `py-modules`.
RECIPES: dict[str, list[str]] = {
    "povid_generate": ["llava_generate"],
    "llava_sft": ["llava_sft_tiny_full", "llava_sft_tiny_lora"],
    "povid_eval": ["eval_chair_coco", "eval_chair_opera", "eval_pope_coco"],
    "povid_distort": ["povid_distort"],
    "povid_audit": ["povid_audit"],
    "povid_hallucinate": ["povid_hallucinate_openai", "povid_hallucinate_rules", "povid_hallucinate_world"],
    "povid_dpo": [
        "povid_tiny_lora", "povid_tiny_qlora", "povid_tiny_full",
        "povid_7b_lora", "povid_7b_qlora", "povid_7b_full", "povid_13b_lora",
        "povid_7b_lora_stage1", "povid_7b_lora_stage2",
    ],
}


class ConfigNotFoundError(FileNotFoundError):
    """A `--config` value that is neither an existing file nor a packaged config name."""


class RecipeNotFoundError(ModuleNotFoundError):
    """A recipe listed in `RECIPES` whose module is not importable."""


def configs_dir() -> Path:
    """Return the directory holding the packaged YAML configs."""
    # `povid.recipe_configs` is a regular package installed on disk (editable or not, never
    # zipped), so its Traversable is a real pathlib.Path.
    return Path(str(importlib.resources.files(CONFIG_PACKAGE)))


def packaged_configs() -> list[str]:
    """Return the names of all packaged configs, sorted (file stems, without `.yaml`)."""
    return sorted(p.stem for p in configs_dir().glob(f"*{CONFIG_SUFFIX}"))


def recipe_file(name: str) -> Path:
    """Return the source file of recipe `name` (a key of `RECIPES`).

    Raises:
        KeyError: `name` is not one of our recipes.
        RecipeNotFoundError: the recipe is registered but its module is not installed.
    """
    if name not in RECIPES:
        raise KeyError(f"Unknown recipe {name!r}. Recipes: {', '.join(sorted(RECIPES))}")
    # find_spec locates a top-level module without importing (running) the recipe.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RecipeNotFoundError(
            f"Recipe {name!r} is listed in povid.config.RECIPES but its module is not "
            "importable: is it in pyproject's `py-modules`, and is the project (re)installed "
            "(`pip install -e .`)?",
            name=name,
        )
    return Path(spec.origin)


def resolve_config(name_or_path: str) -> Path:
    """Turn a `--config` value into a YAML file path.

    An existing file (relative to the current directory, or absolute) wins; otherwise
    `name_or_path` is looked up, with or without `.yaml`, among the packaged configs.

    Raises:
        ConfigNotFoundError: neither a file nor a packaged config; the message lists the
            packaged config names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.absolute()
    name = name_or_path.removesuffix(CONFIG_SUFFIX)
    available = packaged_configs()
    if name in available:
        return configs_dir() / f"{name}{CONFIG_SUFFIX}"
    raise ConfigNotFoundError(
        f"Config {name_or_path!r} not found: no file at {path.absolute()} and no packaged config "
        f"of that name. Packaged configs: {', '.join(available) or '(none)'} "
        "(`povid ls` shows them with their recipes)."
    )


def _config_arg(value: str) -> str:
    """argparse `type` for `--config`: resolve it, reporting failure as a usage error."""
    try:
        return str(resolve_config(value))
    except ConfigNotFoundError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_config(argv: Sequence[str] | None = None, description: str | None = None) -> DictConfig:
    """Parse `--config CFG [key=value ...] [~key ...]` into a DictConfig, the way recipes do.

    Same semantics as torchtune's `config.parse` (its parser and YAML/CLI merge are reused),
    except that CFG may be a packaged config name (see `resolve_config`) and that bad
    overrides exit with a usage error (status 2) instead of a traceback.

    Args:
        argv: command-line arguments without the program name; `sys.argv[1:]` if None.
        description: help text for `--help` (the recipe's docstring).

    Returns:
        The merged config; interpolations such as `${output_dir}/x` stay lazy, so they see
        command-line overrides.
    """
    # Imported here because importing torchtune takes seconds (see module docstring).
    from omegaconf import OmegaConf
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    parser = TuneRecipeArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # torchtune's parser declares `--config` as a plain string and OmegaConf.load()s it;
    # giving that action our resolver as its `type` makes names work before the load.
    parser._option_string_actions["--config"].type = _config_arg
    try:
        # Unknown `--flags`, a bad `~key` or an override without exactly one "=" raise
        # ValueError in torchtune: report them as usage errors, like any argparse mistake.
        yaml_args, cli_args = parser.parse_known_args(argv)
        # torchtune's parser drops the path once the YAML's keys are its defaults.
        check_override_keys(OmegaConf.create(vars(yaml_args)), cli_args)
        return _merge_yaml_and_cli_args(yaml_args, cli_args)
    except ValueError as err:
        parser.error(str(err))


# Keys our configs used to have -> where the value lives now. An old key on the command line
# stops with the new name, not with a generic "unknown key".
RENAMED_KEYS: dict[str, str] = {
    "objective": "loss",
    "projector_trainable": "model.projector_trainable",
    "warmup_ratio": "lr_scheduler.warmup_ratio",
}


def _config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a loaded YAML config (blocks and leaves), in file order."""
    from omegaconf import DictConfig

    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys.extend(_config_keys(node._get_node(key), dotted + "."))
    return keys


def _renamed(key: str) -> str | None:
    """The current name of ``key`` if it (or the block it is in) was renamed, else None."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def check_override_keys(yaml_cfg: "DictConfig", overrides: Sequence[str]) -> None:
    """Reject command-line overrides whose key the config does not have.

    OmegaConf adds any key it is given, so without this check a typo (``los.beta=0.2``) or
    another toolkit's name for a setting is silently ignored and the run trains with the
    default. A key inside a ``_component_`` block is allowed: it becomes a keyword argument of
    that component (a user's own builder may take more), and instantiation rejects one the
    component does not accept. Renamed keys (:data:`RENAMED_KEYS`) name their new key.

    Args:
        yaml_cfg: the config file as loaded, before the overrides.
        overrides: torchtune's command-line items (``key=value`` or ``~key``).

    Raises:
        ValueError: an unknown key; the message names it and the closest valid key.
    """
    known = _config_keys(yaml_cfg)
    known_set = set(known)
    override_keys = [item.lstrip("~").split("=", 1)[0] for item in overrides]
    # A `_component_` given on the command line opens its block to new keyword arguments too.
    components = {k.rsplit(".", 1)[0] for k in [*known, *override_keys] if k.endswith("._component_")}
    for key in override_keys:
        if key in known_set:
            continue
        parts = key.split(".")
        if any(".".join(parts[:i]) in components for i in range(1, len(parts))):
            continue
        new = _renamed(key)
        if new is not None:
            raise ValueError(f"config: {key!r} was renamed: use {new!r}")
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else " (no key of that config is close; the config file lists them all)"
        raise ValueError(f"config: unknown key {key!r}{hint}")


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """Decorate a recipe's `main(cfg)` so that calling `main()` parses the command line.

    Like torchtune's `config.parse`, but `--config` also accepts packaged config names, and the
    wrapper returns `recipe_main`'s result instead of calling `sys.exit` itself (recipes end with
    `sys.exit(main())`, which behaves the same, and tests can call `main([...])`).

    Example:
        >>> @parse
        ... def main(cfg: DictConfig) -> None:
        ...     ...
        >>> # python -m povid_generate --config llava_generate output_dir=/tmp/out
    """

    @functools.wraps(recipe_main)
    def wrapper(argv: Sequence[str] | None = None) -> Any:
        return recipe_main(load_config(argv, description=recipe_main.__doc__))

    return wrapper


def check_choice(cfg: "DictConfig", key: str, choices: Sequence[Any]) -> Any:
    """The value at the dotted ``key`` of ``cfg`` (``None`` if unset), checked against ``choices``.

    A typo in an enumerated setting must not silently select another branch of a recipe.

    Raises:
        ValueError: the value is not one of ``choices``; the message names the key, the value
            and the choices.
    """
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ValueError(f"config: {key}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value
