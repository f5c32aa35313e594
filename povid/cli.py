"""The `povid` command: list and copy our recipes and configs, like `tune ls` / `tune cp`.

Running a recipe stays `tune run <recipe> --config <config>` (recipes resolve packaged config
names themselves, see `povid.config.parse`). This module does not import torchtune, so it
answers instantly.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from povid.config import (
    CONFIG_SUFFIX,
    RECIPES,
    RecipeNotFoundError,
    configs_dir,
    packaged_configs,
    recipe_file,
)

_NULL_VALUE = "<>"  # shown for a recipe without configs, as `tune ls` does


def _ls(args: argparse.Namespace) -> int:
    """Print a RECIPE / CONFIG table; a recipe's name appears on its first config only."""
    print(f"{'RECIPE':<40} {'CONFIG':<40}".rstrip())
    for recipe, configs in RECIPES.items():
        for i, config in enumerate(configs or [_NULL_VALUE]):
            print(f"{recipe if i == 0 else '':<40} {config}")
    return 0


def _source(name: str, parser: argparse.ArgumentParser) -> Path:
    """Return the file behind a recipe or config name, or exit with a usage error."""
    if name in RECIPES:
        try:
            return recipe_file(name)
        except RecipeNotFoundError as err:  # an installation problem, not a usage error
            parser.exit(1, f"povid cp: error: {err}\n")
    config = name.removesuffix(CONFIG_SUFFIX)
    if config in packaged_configs():
        return configs_dir() / f"{config}{CONFIG_SUFFIX}"
    parser.error(
        f"unknown recipe or config {name!r}. Recipes: {', '.join(RECIPES)}. "
        f"Configs: {', '.join(packaged_configs())}. (`povid ls` shows them.)"
    )


def _destination(src: Path, dest: Path, raw_dest: str) -> Path:
    """Where `povid cp` writes: into `dest` if it is a directory, else `dest` with a suffix.

    Unlike `tune cp`, which replaces any suffix (`a.yml` -> `a.yaml`, and a directory `out`
    becomes a file `out.yaml`), the source's suffix is only added when `dest` has none.
    """
    if dest.is_dir() or raw_dest.endswith(("/", "\\")):
        return dest / src.name
    return dest if dest.suffix else dest.with_suffix(src.suffix)


def _cp(args: argparse.Namespace) -> int:
    """Copy a recipe or config to a local path; never overwrite unless --force."""
    src = _source(args.name, args.parser)
    dest = _destination(src, Path(args.destination), args.destination)
    if dest.exists() and not args.force:
        if args.no_clobber:
            print(f"File already exists at {dest.absolute()}, not overwriting.")
            return 0
        args.parser.exit(
            1, f"povid cp: error: {dest} already exists; pass --force to overwrite it.\n"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # copyfile, not copy: an installed (possibly read-only) file's mode must not follow the
    # user's copy, which they are about to edit.
    shutil.copyfile(src, dest)
    print(f"Copied {src.name} to {dest}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run the offline default job (imports torch, so only here)."""
    from povid_demo.chain import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Print povid_eval results side by side with the differences from the first file."""
    from povid.metrics.report import compare_files  # torch-free, but only `compare` needs it

    if len(args.results) < 2:
        args.parser.error("give two or more results files (e.g. base and POVID)")
    try:
        table = compare_files(args.results)
    except (FileNotFoundError, ValueError) as err:
        args.parser.exit(1, f"povid compare: error: {err}\n")
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    """The `povid` parser with its `ls` and `cp` subcommands."""
    parser = argparse.ArgumentParser(
        prog="povid",
        description="POVID toolkit: list and copy recipes and configs. "
        "Run a recipe with `tune run <recipe> --config <config> [key=value ...]`.",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
    subparsers = parser.add_subparsers(title="subcommands", metavar="{ls,cp,demo,compare}")

    ls = subparsers.add_parser(
        "ls",
        help="List our recipes and their packaged configs",
        description="List our recipes and their packaged configs",
    )
    ls.set_defaults(func=_ls)

    cp = subparsers.add_parser(
        "cp",
        help="Copy a recipe or config to a local path",
        description="Copy a recipe (.py) or packaged config (.yaml) to a local path.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
                $ povid cp llava_generate my_configs/generate   # -> my_configs/generate.yaml
                $ povid cp povid_generate .                     # -> ./povid_generate.py
                $ tune run povid_generate --config my_configs/generate.yaml
            """
        ),
    )
    cp.add_argument("name", help="recipe or config name (see `povid ls`)")
    cp.add_argument(
        "destination",
        help="file or directory; the source's suffix is added to a file name without one",
    )
    clobber = cp.add_mutually_exclusive_group()
    clobber.add_argument(
        "-f", "--force", action="store_true", help="overwrite the destination if it exists"
    )
    clobber.add_argument(
        "-n",
        "--no-clobber",
        action="store_true",
        help="if the destination exists, leave it and succeed (as `tune cp -n`)",
    )
    cp.add_argument(
        "--make-parents",
        action="store_true",
        help="accepted for `tune cp` compatibility; parent directories are always created",
    )
    cp.set_defaults(func=_cp, parser=cp)

    demo = subparsers.add_parser(
        "demo",
        help="Run the whole POVID pipeline offline on a synthetic world (CPU, ~15 min)",
        description="Make a synthetic world, train its base LLaVA (llava_sft), build POVID's "
        "preference data (povid_hallucinate with the world's scene-level backend, povid_distort), "
        "audit the pairs (povid_audit), train (povid_dpo) and evaluate base and POVID "
        "(povid_eval: CHAIR, POPE). Each stage is a `tune run` command; "
        "a rerun reuses finished stages. Nothing is downloaded.",
    )
    demo.add_argument("--output-dir", default="povid_outputs/demo", help="where everything goes")
    demo.add_argument("--quick", action="store_true", help="smoke-test size: every stage in about two minutes, numbers meaningless")
    demo.add_argument("--seed", type=int, default=0, help="seed of the world and of every stage")
    demo.set_defaults(func=_demo)

    compare = subparsers.add_parser(
        "compare",
        help="Compare povid_eval results files (CHAIR / POPE) side by side",
        description="Print a Markdown table of the metrics of each results.json written by "
        "`tune run povid_eval`, with each run's difference from the first, and list the "
        "protocol settings that differ between the runs.",
    )
    compare.add_argument("results", nargs="+", help="results.json files; the first is the baseline")
    compare.add_argument("-o", "--output", help="also write the table to this Markdown file")
    compare.set_defaults(func=_compare, parser=compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `povid` console script; returns the exit status.

    Usage errors (unknown name, bad arguments) exit with status 2 via argparse; refusing to
    overwrite a file exits with status 1.
    """
    args = _build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
