"""POVID on the synthetic world, several seeds: does it cut hallucination, and against what?

For each seed, the demo chain at full size (``povid demo``'s stages, each a ``tune run``):
world, base model (``llava_sft``), stage 1 (the ``world`` backend), stage 2 (``povid_distort``),
then five models, each evaluated with ``povid_eval`` (CHAIR on the held-out balanced test split, POPE on
the same images):

- ``base``: the SFT model;
- ``povid``: ``povid_dpo`` with text and noise dispreferred answers (the demo's settings);
- ``dpo_text``: the same, text dispreferred only (``objective=dpo``, ``noise.source=none``);
- ``dpo_noise``: the same, noise dispreferred only (``loss.beta1=0``: the margin is the
  chosen log-ratio minus the noise answer's; the paper's "image distortion only" ablation);
- ``sft_more``: a control that continues ``llava_sft`` on the same preference images' ground
  truth for the same compute (as many steps, as many rows per step as DPO scores: chosen,
  rejected and noise answer of each record; at DPO's learning rate).

Prints mean and spread (sample standard deviation over seeds) and writes ``results.json`` and
``results.md`` next to the runs. A rerun reuses every finished stage.

    python benchmarks/povid_synthetic.py --seeds 0 1 2 --out povid_outputs/bench_synthetic
    python benchmarks/povid_synthetic.py --quick --seeds 0      # smoke test, minutes
    python benchmarks/povid_synthetic.py --base-only --seeds 0 1 2   # the base criteria only

Extra ``povid_dpo`` overrides for the two DPO variants (``--dpo key=value ...``) go after the
demo's, e.g. ``--dpo loss.beta=0.5``, and ``povid_hallucinate`` overrides (``--stage1
rules.max_edits=1``) make a variant with its own stage 1 and 2 data, ``povid_distort`` overrides
(``--stage2 noise_step=700``) one with its own stage 2 data; ``--tag`` names the variant.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence

from povid_demo.chain import DEMO_SIZES, Demo, summary_rows
from povid.metrics.report import read_results
from povid_demo.criteria import base_criteria, criteria_as_dict
from povid_data.synthetic_world import make_world

VARIANTS = ("base", "povid", "dpo_text", "dpo_noise", "sft_more")
METRICS = [
    ("chair_s", "CHAIR_S %"), ("chair_i", "CHAIR_I %"), ("recall", "recall %"),
    ("companion", "companion %"), ("pope_f1", "POPE F1 %"), ("pope_adversarial_f1", "POPE adv F1 %"),
    ("length", "words"),
]  # fmt: skip


def balanced_preference_images(demo: Demo) -> Demo:
    """The same chain over other preference images: the ``pref`` split drawn from the balanced
    distribution (a kind's companion present half the time, as in ``test``) instead of the
    training one (80 %), so that more pairs stand on images where the companion is absent."""
    world_dir = demo.out / "world_pref_balanced"
    done = world_dir / ".stage_done.json"
    if not done.exists():
        world = replace(demo.settings.world, train=0, test=0, test_iid=0, splits={"pref": "balanced"})
        make_world(world_dir, world, progress=lambda m: print(f"[bench] balanced preference images: {m}"))
        done.write_text("{}\n")
    return Demo(demo.out, demo.settings, world_dir=world_dir)


def seed_demo(out: Path, seed: int, quick: bool) -> Demo:
    """The demo chain of one seed at the full (or quick) size, in ``out/seed_<seed>``."""
    settings = DEMO_SIZES["quick" if quick else "default"]
    return Demo(out / f"seed_{seed}", replace(settings, world=replace(settings.world, seed=seed)))


def base_criteria_of_seed(out: Path, seed: int, quick: bool) -> Dict[str, dict]:
    """World, base model and its evaluation for one seed; the world's base criteria."""
    demo = seed_demo(out, seed, quick)
    demo.world()
    files = demo.evaluate(demo.sft(), "base", title="povid_eval")
    return criteria_as_dict(base_criteria(read_results(files["chair"]), read_results(files["pope"])))


def criteria_per_seed_table(per_seed: Dict[int, Dict[str, dict]]) -> str:
    """Markdown: one row per criterion, one column per seed (value, and a mark when not met)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    lines = ["| base criterion | needs | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]  # fmt: skip
    for key, criterion in first.items():
        cells = []
        for seed in seeds:
            c = per_seed[seed][key]
            value = "n/a" if c["value"] is None else f"{100 * c['value']:.1f}"
            cells.append(value if c["passed"] else f"{value} (NOT MET)")
        lines.append(f"| {criterion['label']} | >= {100 * criterion['threshold']:.0f} | " + " | ".join(cells) + " |")
    met = [s for s in seeds if all(c["passed"] for c in per_seed[s].values())]
    lines.append(f"\nall criteria met on seeds {met} of {seeds}" if met else f"\nno seed meets every criterion ({seeds})")
    return "\n".join(lines) + "\n"


def run_seed(
    out: Path, seed: int, quick: bool, dpo_extra: List[str], tag: str, stage1_extra: List[str],
    balanced_pref: bool = False, variants: Sequence[str] = VARIANTS, stage2_extra: Sequence[str] = (),
) -> Dict[str, Dict[str, Path]]:  # fmt: skip
    """Train and evaluate ``variants`` (``base`` always) for one seed; returns their results files."""
    demo = seed_demo(out, seed, quick)
    settings = demo.settings
    demo.world()
    base = demo.sft()
    suffix = f"_{tag}" if tag else ""
    # A stage-1 or preference-image variant gets its own stage 1 and 2 data, a stage-2 variant its
    # own stage 2 data; the base, the SFT control and the evaluation images are shared.
    data = suffix if stage1_extra or balanced_pref else ""
    data2 = suffix if data or stage2_extra else ""
    pairs = balanced_preference_images(demo) if balanced_pref else demo
    stage2 = pairs.stage2(base, pairs.stage1(f"stage1{data}", stage1_extra), name=f"stage2{data2}", extra=stage2_extra)
    dpo_variants = {
        "povid": [],
        "dpo_text": ["loss.objective=dpo", "noise.source=none"],
        "dpo_noise": ["loss.beta1=0"],
    }
    models = {"base": base}
    # The control follows the DPO variants' learning rate: a --dpo override gets its own control.
    names = {"base": "base", "sft_more": f"sft_more{suffix}" if dpo_extra else "sft_more"}
    for variant, overrides in dpo_variants.items():
        if variant in variants:
            names[variant] = f"{variant}{suffix}"
            models[variant] = pairs.dpo(base, stage2, name=names[variant], extra=[*dpo_extra, *overrides],
                                        title=f"povid_dpo: {names[variant]}")  # fmt: skip
    if "sft_more" in variants:
        # Same compute as DPO: as many optimizer steps, each on as many rows (3 answers per record).
        n_pref = settings.world.pref
        dpo_steps = math.ceil(n_pref / settings.dpo_batch_size) * settings.dpo_epochs
        rows = 3 * settings.dpo_batch_size
        # The last optimizer.lr wins, as on the tune command line (a --dpo override after the demo's).
        lr = [o.split("=", 1)[1] for o in [*settings.dpo_overrides, *dpo_extra] if o.startswith("optimizer.lr=")][-1]
        models["sft_more"] = demo.sft(
            names["sft_more"], checkpoint_dir=base, data_file=demo.world_dir / "pref.json", batch_size=rows,
            epochs=math.ceil(dpo_steps * rows / n_pref), max_steps=dpo_steps, lr=float(lr),
            title="llava_sft: same-compute SFT control",
        )  # fmt: skip
    return {variant: demo.evaluate(model, names[variant], title="povid_eval") for variant, model in models.items()}


def aggregate(per_seed: Dict[int, List[dict]], variants: Sequence[str] = VARIANTS) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{variant: {metric: {"mean", "std", "values"}}}`` over seeds."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for variant in variants:
        out[variant] = {}
        for key, _ in METRICS:
            values = [next(r for r in rows if r["variant"] == variant)[key] for rows in per_seed.values()]
            out[variant][key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
    return out


def table(agg: Dict[str, Dict[str, Dict[str, float]]], n_seeds: int) -> str:
    header = ["model"] + [label for _, label in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for variant in agg:
        cells = [variant] + [f"{agg[variant][k]['mean']:.1f} ± {agg[variant][k]['std']:.1f}" for k, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    base_i = agg["base"]["chair_i"]["mean"]
    lines.append("")
    for variant in [v for v in agg if v != "base"]:
        rel = 100 * (agg[variant]["chair_i"]["mean"] - base_i) / base_i if base_i else float("nan")
        d_recall = agg[variant]["recall"]["mean"] - agg["base"]["recall"]["mean"]
        d_f1 = agg[variant]["pope_f1"]["mean"] - agg["base"]["pope_f1"]["mean"]
        lines.append(f"- {variant}: CHAIR_I {rel:+.0f} % relative to base; recall {d_recall:+.1f} points; "
                     f"POPE F1 {d_f1:+.1f} points")  # fmt: skip
    lines.append("\nCHAIR_I per seed: " + "; ".join(
        f"{v} " + " / ".join(f"{x:.1f}" for x in agg[v]["chair_i"]["values"]) for v in agg))  # fmt: skip
    if "povid" in agg:
        # Paired by seed (same world, base and pairs): the spread of the difference, not of each arm.
        for other in [v for v in agg if v not in ("base", "povid")]:
            diffs = [p - o for p, o in zip(agg["povid"]["chair_i"]["values"], agg[other]["chair_i"]["values"])]
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            lines.append(f"- povid minus {other}, CHAIR_I points, paired by seed: {statistics.fmean(diffs):+.1f} ± {spread:.1f} "
                         f"({', '.join(f'{d:+.1f}' for d in diffs)})")  # fmt: skip
    lines.append(f"\nmean ± sample standard deviation over {n_seeds} seed(s)")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("povid_outputs/bench_synthetic"))
    parser.add_argument("--quick", action="store_true", help="the demo's reduced size (a smoke test)")
    parser.add_argument("--dpo", nargs="*", default=[], help="extra povid_dpo overrides for both DPO variants")
    parser.add_argument("--stage1", nargs="*", default=[], help="extra povid_hallucinate overrides (needs --tag)")
    parser.add_argument("--stage2", nargs="*", default=[], help="extra povid_distort overrides (needs --tag)")
    parser.add_argument("--balanced-pref", action="store_true",
                        help="preference images from the balanced distribution (needs --tag)")  # fmt: skip
    parser.add_argument("--base-only", action="store_true",
                        help="stop after the base evaluation and report the world's base criteria per seed")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS[1:],
                        help="the models to train besides the base (default: all)")  # fmt: skip
    parser.add_argument("--tag", default="", help="name suffix of the runs made with --dpo / --stage1 / --stage2 overrides")
    args = parser.parse_args(argv)
    if (args.dpo or args.stage1 or args.stage2 or args.balanced_pref) and not args.tag:
        parser.error("--dpo, --stage1, --stage2 and --balanced-pref variants need a --tag to keep their runs apart")
    start = time.perf_counter()
    if args.base_only:
        criteria = {seed: base_criteria_of_seed(args.out, seed, args.quick) for seed in args.seeds}
        text = criteria_per_seed_table(criteria)
        (args.out / "base_criteria.json").write_text(json.dumps({str(s): c for s, c in criteria.items()}, indent=2) + "\n")
        (args.out / "base_criteria.md").write_text(text)
        print(f"\nThe world's base criteria, held-out balanced test split, seeds {args.seeds}\n\n{text}")
        print(f"{(time.perf_counter() - start) / 60:.1f} min; results in {args.out / 'base_criteria.md'}")
        return 0
    per_seed: Dict[int, List[dict]] = {}
    criteria: Dict[int, Dict[str, dict]] = {}
    for seed in args.seeds:
        results = run_seed(args.out, seed, args.quick, args.dpo, args.tag, args.stage1, args.balanced_pref,
                           ["base", *args.variants], args.stage2)  # fmt: skip
        rows = summary_rows(results)
        for variant, row in zip(results, rows):
            row["variant"] = variant
        per_seed[seed] = rows
        base = results["base"]
        criteria[seed] = criteria_as_dict(base_criteria(read_results(base["chair"]), read_results(base["pope"])))
    agg = aggregate(per_seed, ["base", *args.variants])
    text = table(agg, len(args.seeds)) + "\n" + criteria_per_seed_table(criteria)
    name = f"results{'_' + args.tag if args.tag else ''}"
    (args.out / f"{name}.json").write_text(json.dumps({"per_seed": per_seed, "aggregate": agg,
                                                      "base_criteria": criteria, "dpo_overrides": args.dpo, "stage1_overrides": args.stage1,
                                                      "stage2_overrides": args.stage2,
                                                      "balanced_pref": args.balanced_pref},
                                                     indent=2) + "\n")  # fmt: skip
    (args.out / f"{name}.md").write_text(text)
    n = per_seed[args.seeds[0]][0]["captions"]
    print(f"\nPOVID on the synthetic world: {n} held-out balanced test images, seeds {args.seeds}\n")
    print(text)
    print(f"{(time.perf_counter() - start) / 60:.1f} min; results in {args.out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
