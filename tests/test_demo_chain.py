"""`povid demo --quick`: the whole chain at a reduced size, its artefacts, table and rerun."""

import json

import pytest
from PIL import Image

from povid.cli import main as povid_main
from povid_demo.chain import companion_hallucination_rate, summary_table


@pytest.mark.slow
def test_quick_chain_runs_end_to_end_and_reruns_from_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert povid_main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out

    # Every stage left its output: world, base model, stage 1 and 2 data, POVID model, evals.
    world = json.loads((out / "world" / "world.json").read_text())
    assert world["splits"]["test"]["distribution"] == "balanced"
    for model in ("sft", "povid"):
        assert (out / model / "final" / "model" / "config.json").exists()
        assert (out / model / "metrics.jsonl").read_text().strip()
    stage2 = [json.loads(line) for line in (out / "stage2" / "preferences.jsonl").read_text().splitlines()]
    assert len(stage2) == world["config"]["pref"]
    assert all("rejected_conversations" in r for r in stage2)
    assert sum("noise_conversations" in r for r in stage2) > 0.9 * len(stage2)
    for name in ("base", "povid"):
        for bench in ("chair", "pope"):
            assert json.loads((out / "eval" / f"{name}_{bench}" / "results.json").read_text())["name"] == name
        # The demo's CHAIR counts as its README tables were measured (see Demo.evaluate).
        assert json.loads((out / "eval" / f"{name}_chair" / "results.json").read_text())["protocol"]["chair_mode"] == "corrected"

    # The table: both models, every headline column, numbers that are percentages.
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [r["name"] for r in rows] == ["base", "povid"]
    for row in rows:
        for key in ("chair_s", "chair_i", "recall", "companion", "pope_f1"):
            assert 0.0 <= row[key] <= 100.0
        assert row["captions"] == world["config"]["test"]
    assert summary_table(rows) == (out / "summary.md").read_text()
    assert "| povid |" in printed and "CHAIR_I %" in printed
    # The pair audit of both stage-2 variants ran and its headline is printed.
    for name in ("audit", "audit_online"):
        audit = json.loads((out / name / "audit.json").read_text())
        assert audit["answers"]["rejected"]["all"]["pairs"] == world["config"]["pref"]
        assert audit == summary["audits"]["dataset noise" if name == "audit" else "online noise"]
    assert printed.count("pair audit of the base") == 2 and "share that needs the image" in printed
    # The base criteria: printed with a verdict per line (at this size they need not pass).
    criteria = json.loads((out / "base_criteria.json").read_text())["criteria"]
    assert len(criteria) == 6 and all(isinstance(c["passed"], bool) for c in criteria.values())
    assert (out / "base_criteria.md").read_text() in printed
    assert "| base criterion | value | needs | result |" in printed
    assert printed.count(" | PASS |") + printed.count(" | NOT MET |") >= 12  # after the base eval and at the end
    figure = Image.open(out / "summary.png")
    assert figure.width == 1400 and figure.height > 400

    # A rerun reuses every finished stage.
    assert povid_main(["demo", "--quick", "--output-dir", str(out)]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("done before, reusing") == 11  # world, sft, stage 1, stage 2, 2 audits, dpo, 4 evals
    assert json.loads((out / "summary.json").read_text())["rows"] == rows


def test_companion_rate_counts_captions_that_add_a_missing_partner():
    result = {"details": [
        {"ground_truth": ["pizza"], "hallucinated": [["donut", "donut"]]},  # the companion: counts
        {"ground_truth": ["pizza"], "hallucinated": [["kite", "kite"]]},  # another object: not
        {"ground_truth": ["book", "clock"], "hallucinated": []},
        {"ground_truth": ["kite"], "hallucinated": [["frisbee", "frisbee"], ["frisbee", "frisbee"]]},
    ]}  # fmt: skip
    assert companion_hallucination_rate(result) == 0.5


def test_demo_evaluates_chair_with_corrected_counting(tmp_path, monkeypatch):
    from povid_demo.chain import DEMO_SIZES, Demo

    commands = {}
    monkeypatch.setattr(Demo, "_run", lambda self, key, title, command, stage_dir: commands.setdefault(key, command))
    Demo(tmp_path, DEMO_SIZES["quick"]).evaluate(tmp_path / "model", "base")
    assert "chair.mode=corrected" in commands["eval_base_chair"]
    assert not any(part.startswith("chair.") for part in commands["eval_base_pope"])


def test_stage2_overrides_reach_povid_distort_after_the_settings(tmp_path, monkeypatch):
    from povid_demo.chain import DEMO_SIZES, Demo

    commands = {}
    monkeypatch.setattr(Demo, "_run", lambda self, key, title, command, stage_dir: commands.setdefault(key, command))
    demo = Demo(tmp_path, DEMO_SIZES["quick"])
    out = demo.stage2(tmp_path / "model", tmp_path / "stage1.jsonl", name="stage2_t700", extra=["noise_step=700"])
    assert out == tmp_path / "stage2_t700" / "preferences.jsonl"
    command = commands["stage2_t700"]
    assert command[-1] == "noise_step=700"  # last, so it wins over the config and the settings
    assert f"output_dir={tmp_path / 'stage2_t700'}" in command
    demo.stage2(tmp_path / "model", tmp_path / "stage1.jsonl")
    assert not any(part.startswith("noise_step=") for part in commands["stage2"])


def test_synthetic_benchmark_refuses_an_untagged_stage2_variant():
    import importlib.util
    from pathlib import Path

    # Loaded from its file as tests/test_precision.py loads its benchmark: sys.path stays as it is.
    spec = importlib.util.spec_from_file_location(
        "povid_synthetic", Path(__file__).resolve().parents[1] / "benchmarks" / "povid_synthetic.py"
    )
    povid_synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(povid_synthetic)

    with pytest.raises(SystemExit):
        povid_synthetic.main(["--seeds", "0", "--stage2", "noise_step=700"])
