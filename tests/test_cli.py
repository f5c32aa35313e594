"""The `povid` CLI (ls, cp) and config resolution/parsing used by every recipe."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from povid.cli import main
from povid.config import (
    RECIPES,
    ConfigNotFoundError,
    configs_dir,
    packaged_configs,
    parse,
    recipe_file,
    resolve_config,
)

RECIPE, CONFIG = "povid_generate", "llava_generate"


# ---- registry ---------------------------------------------------------------------------------


def test_registry_matches_installed_files():
    # Every registered recipe is importable and every registered config is packaged ...
    for recipe, configs in RECIPES.items():
        assert recipe_file(recipe).is_file()
        assert set(configs) <= set(packaged_configs())
    # ... and no packaged config is missing from RECIPES (it would be invisible in `povid ls`).
    registered = {c for configs in RECIPES.values() for c in configs}
    assert set(packaged_configs()) <= registered


# ---- povid ls / --help ------------------------------------------------------------------------


def test_ls_lists_recipe_with_its_config(capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    assert [RECIPE, CONFIG] in [line.split() for line in lines[1:]]


def test_installed_executable_help_lists_subcommands(tmp_path):
    exe = Path(sys.executable).parent / "povid"
    if not exe.exists():
        pytest.skip("povid console script not installed next to this interpreter")
    result = subprocess.run(
        [str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "ls" in result.stdout and "cp" in result.stdout


# ---- povid cp ---------------------------------------------------------------------------------


def test_cp_recipe_is_identical_to_installed(tmp_path):
    assert main(["cp", RECIPE, str(tmp_path / "my_recipe")]) == 0
    assert (tmp_path / "my_recipe.py").read_bytes() == recipe_file(RECIPE).read_bytes()


def test_cp_config_adds_suffix_and_creates_parents(tmp_path):
    assert main(["cp", CONFIG, str(tmp_path / "a" / "b" / "gen")]) == 0
    copied = tmp_path / "a" / "b" / "gen.yaml"
    assert copied.read_bytes() == (configs_dir() / f"{CONFIG}.yaml").read_bytes()


def test_cp_into_directory_keeps_file_name(tmp_path):
    assert main(["cp", RECIPE, str(tmp_path)]) == 0
    assert (tmp_path / f"{RECIPE}.py").is_file()


def test_cp_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    dest = tmp_path / "gen.yaml"
    dest.write_text("mine\n")

    with pytest.raises(SystemExit) as exc:
        main(["cp", CONFIG, str(dest)])
    assert exc.value.code == 1
    assert "--force" in capsys.readouterr().err
    assert dest.read_text() == "mine\n"

    assert main(["cp", "--no-clobber", CONFIG, str(dest)]) == 0
    assert dest.read_text() == "mine\n"

    assert main(["cp", "--force", CONFIG, str(dest)]) == 0
    assert dest.read_bytes() == (configs_dir() / f"{CONFIG}.yaml").read_bytes()


def test_cp_unknown_name_is_a_usage_error_listing_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cp", "no_such_thing", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_thing" in err and RECIPE in err and CONFIG in err
    assert not list(tmp_path.iterdir())


# ---- resolve_config ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CONFIG, f"{CONFIG}.yaml"])
def test_resolve_packaged_name_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = resolve_config(name)
    assert path == configs_dir() / f"{CONFIG}.yaml"
    assert path.is_file()


def test_existing_relative_file_wins_over_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{CONFIG}.yaml").write_text("local: true\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("local: true\n")

    assert resolve_config(f"{CONFIG}.yaml") == tmp_path / f"{CONFIG}.yaml"
    assert resolve_config("sub/mine.yaml") == tmp_path / "sub" / "mine.yaml"


def test_unknown_config_error_lists_packaged_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigNotFoundError) as exc:
        resolve_config("nope.yaml")
    message = str(exc.value)
    assert "nope.yaml" in message and "no file at" in message and CONFIG in message


# ---- parse ------------------------------------------------------------------------------------


@parse
def _recipe_main(cfg: DictConfig) -> DictConfig:
    """Return the parsed config (a stand-in for a recipe's main)."""
    return cfg


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "output_dir: /tmp/default\n"
        "out_file: ${output_dir}/generations.jsonl\n"
        "model:\n  _component_: a.b\n  rank: 8\n"
        "extra: 1\n"
    )
    return path


def test_parse_overrides_reach_interpolations(yaml_file):
    assert _recipe_main(["--config", str(yaml_file)]).out_file == "/tmp/default/generations.jsonl"

    cfg = _recipe_main(["--config", str(yaml_file), "output_dir=X", "model.rank=4", "~extra"])
    assert cfg.out_file == "X/generations.jsonl"
    assert cfg.model == {"_component_": "a.b", "rank": 4}
    assert "extra" not in cfg


def test_parse_accepts_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(_recipe_main(["--config", CONFIG]), DictConfig)


def test_parse_errors_are_usage_errors(tmp_path, monkeypatch, yaml_file, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _recipe_main(["--config", "nope"])
    assert exc.value.code == 2
    assert CONFIG in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        _recipe_main(["--config", str(yaml_file), "~missing"])
    assert exc.value.code == 2
