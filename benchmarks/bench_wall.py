"""Wall time per step of whole runs, as a user experiences them: povid_dpo against TRL.

    python benchmarks/bench_wall.py       # LLaVA-1.5 token shapes, LoRA DPO, ~15 min on 2 cores

Each side runs as a whole process twice, for ``--short`` and ``--long`` optimizer steps, and the
wall time per step is ``(T_long - T_short) / (long - short)``: start-up (imports, model load,
dataset processing, TRL's tokenization) cancels out, and everything a step costs stays in: data
loading and image transforms, the forward and backward passes, logging, metric files, progress
bars. Ours runs ``tune run povid_dpo --config povid_tiny_lora`` exactly as a user types it
(metrics.jsonl, tqdm, the torchtune metric logger, the final checkpoint); TRL runs
``DPOTrainer.train()`` through ``_worker.py`` (no checkpoints: ``save_strategy="no"``). The same
records, model, batch and LoRA as ``bench_vs_trl.py``; one thread per process unless
``--threads``.

It also splits ours from the long run's own ``metrics.jsonl`` over the same steps: the recipe's
step timer (``step_seconds``), the part of it spent waiting for the data loader
(``data_seconds``), and the rest of the whole run's per-step time, spent outside the step
(logging, metric files, the progress bar).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def timed(command: list, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(command)}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava_shapes", choices=sorted(_common.PRESETS))
    p.add_argument("--answer-tokens", type=int, nargs=2, default=[150, 250])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--packing", default="shared_prompt", choices=["none", "shared_prompt"])
    p.add_argument("--workdir", default=str(_common.DEFAULT_WORKDIR))
    a = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    spec = _common.PRESETS[a.preset]
    # One record more than the long run takes: no run reaches the end of an epoch, whose
    # checkpoint would fall in one run only (the final checkpoint, in both, cancels out).
    ws = _common.prepare_workspace(
        spec, seq_len=a.seq_len, n_records=a.batch * (a.long + 1), workdir=Path(a.workdir),
        answer_tokens=tuple(a.answer_tokens),
    )  # fmt: skip
    tune = str(Path(sys.executable).with_name("tune"))
    worker = [sys.executable, str(Path(__file__).with_name("_worker.py")), "--preset", a.preset,
              "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--threads", str(a.threads),
              "--answer-tokens", *map(str, a.answer_tokens), "--workdir", a.workdir, "--warmup", "1"]  # fmt: skip

    # One output folder per run length: the long run's metrics.jsonl is read after the runs.
    outputs = {n: tempfile.mkdtemp(prefix="povid_wall_") for n in (a.short, a.long)}

    def ours(steps: int, out: str) -> list:
        return [tune, "run", "povid_dpo", "--config", "povid_tiny_lora", f"checkpoint_dir={ws.checkpoint_dir}",
                f"data_file={ws.data_file}", f"image_dir={ws.image_dir}", f"output_dir={out}",
                f"batch_size={a.batch}", f"max_seq_len={a.seq_len}", f"max_steps={steps}", "shuffle=false",
                f"packing={a.packing}", "save_merged=false", "log_every_n_steps=1",
                "loss.objective=dpo", "noise.source=none"]  # fmt: skip

    runs = {
        "povid_dpo (tune run)": lambda n: ours(n, outputs[n]),
        "TRL 1.16 (DPOTrainer.train)": lambda n: worker + ["--side", "trl", "--steps", str(n - 1)],
    }
    print(f"{a.preset}: {spec.num_image_tokens} image tokens, answers {a.answer_tokens[0]}-{a.answer_tokens[1]} tokens, "
          f"batch {a.batch} pairs, LoRA DPO, fp32, {a.threads} thread(s), packing={a.packing}", flush=True)  # fmt: skip
    per_step = {}
    for name, command in runs.items():
        t_short, t_long = timed(command(a.short), env), timed(command(a.long), env)
        per_step[name] = (t_long - t_short) / (a.long - a.short)
        print(f"  {name:30s} {a.short} steps {t_short:6.1f} s, {a.long} steps {t_long:6.1f} s -> "
              f"{per_step[name]:.2f} s/step (start-up {t_short - a.short * per_step[name]:.0f} s)", flush=True)
    ours_name, trl_name = list(runs)
    print(f"\nwall time per step of whole runs: povid_dpo {per_step[ours_name]:.2f} s, TRL {per_step[trl_name]:.2f} s "
          f"-> {per_step[trl_name] / per_step[ours_name]:.2f}x TRL's samples/s")  # fmt: skip
    # The long run's own metrics for the steps the short run did not take (the same steps the
    # per-step wall time is over): its step timer, and within it the wait for the data loader.
    with open(Path(outputs[a.long]) / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f][a.short : a.long]
    inside = statistics.fmean(r["step_seconds"] for r in steps)
    data = statistics.fmean(r["data_seconds"] for r in steps)
    print(f"povid_dpo, steps {a.short + 1}-{a.long} of the {a.long}-step run: {inside:.3f} s/step in the step timer, of "
          f"which {data:.3f} s waiting for data (loading, image transforms, collation) and {inside - data:.3f} s "
          f"compute; {per_step[ours_name] - inside:+.3f} s/step outside it (logging, metric files, progress bar)")  # fmt: skip
    print(f"wall_speedup_vs_trl: {per_step[trl_name] / per_step[ours_name]:.2f}")


if __name__ == "__main__":
    main()
