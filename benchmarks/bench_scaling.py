"""povid_dpo throughput and peak memory against sequence length and batch size.

    python benchmarks/bench_scaling.py                 # ~10 min on 2 CPU cores
    python benchmarks/bench_scaling.py --with-trl      # + TRL on the sequence sweep (~17 min)
    python benchmarks/bench_scaling.py --markdown

Same model, data and protocol as ``bench_vs_trl.py`` (LoRA r 8, plain DPO, fp32, one process per
point, warm-up then timed steps). Sequence sweep: batch 1, rows of 256 to 2048 tokens (64 image
tokens + prompt + answer), povid_dpo row by row (output head on answer tokens only) and, with
``--packed``, with ``packing: shared_prompt`` (a boolean mask: SDPA's fused CPU kernel takes it,
but computes every block, so its cost grows with the packed length squared).
Batch sweep: 256-token rows, 1 to 8 pairs. ``model GB`` is ``povid.memory``'s estimate of live
memory (runtime + weights + step) for the point. Peak RSS is higher by what glibc keeps cached
of freed tensors (3.5 GB at 2048 tokens); with ``MALLOC_MMAP_THRESHOLD_=131072`` the same run
peaks at 4.94 GB against the model's 5.17 (``memory_model.py`` checks this way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def estimate_gb(spec, r: dict) -> float:
    """povid.memory's live-memory estimate for a measured point (runtime measured)."""
    from povid.memory import estimate_memory

    est = estimate_memory(
        _common.llava_args(spec, 1000), method=r["method"], lora_rank=8, batch_size=r["batch"],
        seq_len=r["seq_len"], rows_per_example=2, dtype="fp32",
        activation_checkpointing=r["ac"], lora_dropout=0.0,
        logits_positions="answer",  # the recipe and both prototypes score answer positions only
        answer_len=r["seq_len"] - spec.num_image_tokens - 40,
        optimizer_foreach=False,  # PyTorch's AdamW default on CPU: tensor by tensor
    )  # fmt: skip
    return r["runtime_gb"] + est["total"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(_common.PRESETS))
    p.add_argument("--seq-lens", type=int, nargs="*", default=[256, 512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="step time from process CPU time (default with 1 thread) or wall time")
    p.add_argument("--with-trl", action="store_true")
    p.add_argument("--packed", action="store_true", help="also sweep povid_dpo with packing: shared_prompt")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--workdir", default=str(_common.DEFAULT_WORKDIR))
    a = p.parse_args(argv)
    clock = a.clock or ("cpu" if a.threads == 1 else "wall")
    spec = _common.PRESETS[a.preset]
    common = ["--preset", a.preset, "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--threads", str(a.threads), "--workdir", a.workdir]  # fmt: skip
    variants = [("povid_dpo", ["--side", "ours"])]
    if a.packed:
        variants.append(("povid_dpo, packed", ["--side", "ours", "--cfg", "packing=shared_prompt"]))
    if a.with_trl:
        variants.append(("TRL 1.16 (GC off)", ["--side", "trl"]))
    print(f"model: {a.preset} ({_common.count_parameters(spec) / 1e6:.1f} M parameters), LoRA r 8 DPO, fp32, "
          f"{a.threads} thread(s), {a.warmup} warm-up + {a.steps} timed steps", flush=True)  # fmt: skip
    start = time.time()
    seq_rows, batch_rows = [], []
    for seq in a.seq_lens:
        for name, args in variants:
            r = _common.run_worker(args + common + ["--batch", "1", "--seq-len", str(seq)])
            seq_rows.append((name, r))
            print(f"  seq {seq:5d} {name:26s} {_common.step_s(r, clock):6.2f} {clock}-s/step  "
                  f"peak {r['train_peak_gb']:.2f} GB  load {r['load_avg'][0]:.1f}", flush=True)
    for batch in a.batches:
        r = _common.run_worker(["--side", "ours"] + common + ["--batch", str(batch), "--seq-len", "256"])
        batch_rows.append(("povid_dpo", r))
        print(f"  batch {batch:3d} {'povid_dpo':26s} {_common.step_s(r, clock):6.2f} {clock}-s/step  "
              f"peak {r['train_peak_gb']:.2f} GB  load {r['load_avg'][0]:.1f}", flush=True)
    print(f"total {time.time() - start:.0f} s\n")

    def row(name, r, first):
        t = _common.step_s(r, clock)
        return [first, name, f"{t:.2f}", f"{r['batch'] / t:.3f}", f"{r['rows'] * r['seq_len'] / t:.0f}",
                f"{r['train_peak_gb']:.2f}", f"{estimate_gb(spec, r):.2f}" if r["side"] == "ours" else ""]  # fmt: skip

    print(f"Step times are medians of {clock} time per step.")
    head = ["tokens/row", "framework", "s/step", "samples/s", "tokens/s", "peak RSS GB", "model GB (live)"]
    print("Sequence length (batch 1 pair = 2 rows)")
    lines = [row(name, r, r["seq_len"]) for name, r in seq_rows]
    _common.print_table(head, lines, a.markdown)
    print("\nBatch size (pairs; 256 tokens per row)")
    head[0] = "batch"
    lines = [row(name, r, r["batch"]) for name, r in batch_rows]
    _common.print_table(head, lines, a.markdown)


if __name__ == "__main__":
    main()
