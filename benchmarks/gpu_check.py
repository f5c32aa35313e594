"""GPU check: povid_dpo at LLaVA-1.5-7B's shape, row by row and with shared-prompt packing.

    python benchmarks/gpu_check.py                                  # one 80-140 GB GPU, < 8 min
    python benchmarks/gpu_check.py --size tiny --device cpu --steps 3   # the CPU twin (tests run it)

Nothing is downloaded. The script

1. writes a LLaVA-1.5-7B with random weights in bf16 (llava-hf layout, our own builder and
   ``save_llava_hf``), a small SentencePiece tokenizer (the token ids stay below the image token
   32000, as in LLaVA's vocabulary), 336 px images and POVID records whose chosen, rejected and
   noise answers have 150 to 250 tokens: 3 rows of ~830 tokens per example;
2. runs ``tune run povid_dpo --config povid_7b_lora`` (LoRA r 128, bf16 compute, fp32 adapters,
   activation checkpointing, ``loss.objective=povid`` with the dataset's noise answers) for
   ``--steps`` optimizer steps of one example each (no accumulation) twice, with ``packing=none`` and ``packing=shared_prompt``, same seed and
   data, each in its own process as a user runs it;
3. prints per run the median step time and tokens/s (from the recipe's ``metrics.jsonl``, first
   step excluded), ``max_memory_allocated`` against ``povid.memory``'s prediction for the same
   settings, and the largest loss difference between the two runs over all steps.

The last lines are ``gpu_check: ok`` or ``gpu_check: FAILED (...)``: the losses of the two paths
must agree (bf16 compute: within ``--loss-tolerance``) and the measured peak must be within
``--memory-tolerance`` of the model's prediction (on a GPU only; on CPU peak RSS is not comparable).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

ANSWER_TOKENS = {"7b": (150, 250), "tiny": (10, 20)}


def model_args(size: str):
    """LLaVA-1.5-7B, or a tiny model with the same vocabulary, image token and layout."""
    from povid.model import LLAVA_1_5_7B

    if size == "7b":
        return LLAVA_1_5_7B
    return replace(
        LLAVA_1_5_7B, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_dim=128,
        vision_embed_dim=32, vision_num_layers=3, vision_num_heads=2, vision_intermediate_dim=64,
        image_size=56,
    )  # fmt: skip


def write_checkpoint(out: Path, size: str, device: str, seed: int) -> Path:
    """Random weights in bf16 + a tokenizer, in llava-hf layout (reused if already there)."""
    import torch

    from povid.checkpoint import save_llava_hf
    from povid.model import llava_1_5
    from povid_data.tokenizer import train_sentencepiece

    if (out / "config.json").exists() and (out / "tokenizer.model").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = [_common.SYSTEM, f"USER: {_common.QUESTION} ASSISTANT:"] + [_common._sentence(rng) for _ in range(3000)]
    train_sentencepiece(out, corpus, vocab_size=1000, seed=seed)
    from torchtune.training import set_default_dtype

    args = model_args(size)
    torch.manual_seed(seed)
    # Built in bf16 on the device (a 7B in fp32 would be 28 GB), saved from host memory.
    with set_default_dtype(torch.bfloat16), torch.device(device):
        model = llava_1_5(args)
    save_llava_hf({k: v.cpu() for k, v in model.state_dict().items()}, args, out)
    del model
    return out


def write_data(out: Path, checkpoint: Path, size: str, n_records: int, seed: int) -> Path:
    """Images and POVID records (chosen, rejected, noise answers of LLaVA-like length)."""
    from povid_data.tokenizer import LlavaTokenizer

    data_file = out / "preferences.jsonl"
    if data_file.exists():
        return data_file
    out.mkdir(parents=True, exist_ok=True)
    images = _common._write_images(out, n_records, seed)
    tokenizer = LlavaTokenizer.from_dir(checkpoint)
    _common._write_records(out, images, 0, seed, ANSWER_TOKENS[size], tokenizer)
    return data_file


def run_povid_dpo(checkpoint: Path, data_file: Path, out: Path, packing: str, a) -> list:
    """``tune run povid_dpo`` for ``a.steps`` steps; the rows of its ``metrics.jsonl``."""
    tune = Path(sys.executable).with_name("tune")
    command = [
        str(tune), "run", "povid_dpo", "--config", "povid_7b_lora",
        f"checkpoint_dir={checkpoint}", f"data_file={data_file}", f"image_dir={data_file.parent}",
        f"output_dir={out}", f"device={a.device}", f"max_steps={a.steps}", "batch_size=1",
        "gradient_accumulation_steps=1",
        "noise.source=dataset", "loss.objective=povid", f"packing={packing}", "save_every_n_steps=0",
        "save_merged=false", "log_every_n_steps=1", f"seed={a.seed}",
        "resume_from_checkpoint=false",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"povid_dpo with packing={packing} failed (exit {proc.returncode})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"  packing={packing}: {len(rows)} steps in {time.perf_counter() - start:.0f} s (start-up included)", flush=True)
    return rows


def predicted_gb(checkpoint: Path, data_file: Path, size: str, packing: str) -> float:
    """povid.memory's estimate for this run: povid_7b_lora's settings, 3 rows, this data."""
    from omegaconf import OmegaConf

    from povid.memory import estimate_memory
    from povid.model import read_llava_args
    from povid_data.tokenizer import LlavaTokenizer

    cfg = OmegaConf.load(_common.ROOT / "recipe_configs" / "povid_7b_lora.yaml")
    args = read_llava_args(checkpoint)
    tokenizer = LlavaTokenizer.from_dir(checkpoint)
    prompt = _common.prompt_tokens(tokenizer, args.num_image_tokens)
    answers = []
    for line in data_file.read_text().splitlines():
        record = json.loads(line)
        for key in ("conversations", "rejected_conversations", "noise_conversations"):
            answers.append(len(tokenizer.encode(record[key][1]["value"])) + 1)
    answer_len = max(answers)
    est = estimate_memory(
        args, method="lora", lora_rank=int(cfg.model.lora_rank), batch_size=1, seq_len=prompt + answer_len,
        rows_per_example=3, dtype=str(cfg.dtype), activation_checkpointing=bool(cfg.enable_activation_checkpointing),
        lora_dropout=0.0, projector_trainable=bool(cfg.model.projector_trainable), logits_positions="answer",
        answer_len=answer_len, trainable_dtype=str(cfg.trainable_dtype), packing=packing, prompt_len=prompt,
    )  # fmt: skip
    return est["total"]


def summarize(rows: list) -> dict:
    """Median step time and answer tokens/s over the steps after the first (warm-up), peak GB."""
    steady = rows[1:] or rows
    return {
        "step_s": statistics.median(r["step_seconds"] for r in steady),
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in steady),
        "peak_gb": max(r.get("peak_memory_gb", float("nan")) for r in rows),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["7b", "tiny"], default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("povid_outputs/gpu_check"))
    p.add_argument("--loss-tolerance", type=float, default=0.02,
                   help="largest allowed |loss(shared_prompt) - loss(none)| per step (bf16 compute)")
    p.add_argument("--logp-tolerance", type=float, default=0.01,
                   help="largest allowed relative difference of the logged log-probs per step")
    p.add_argument("--memory-tolerance", type=float, default=0.15,
                   help="largest allowed relative error of povid.memory against max_memory_allocated (GPU)")
    a = p.parse_args(argv)
    root = a.workdir / a.size
    start = time.perf_counter()
    checkpoint = write_checkpoint(root / "model", a.size, a.device, a.seed)
    data_file = write_data(root / "data", checkpoint, a.size, n_records=a.steps, seed=a.seed)
    print(f"checkpoint and data in {root} ({time.perf_counter() - start:.0f} s)", flush=True)
    runs = {packing: run_povid_dpo(checkpoint, data_file, root / f"run_{packing}", packing, a)
            for packing in ("none", "shared_prompt")}  # fmt: skip

    failures = []
    print(f"\npovid_dpo, povid_7b_lora at the {a.size} shape, POVID with dataset noise (3 rows), batch 1, {a.steps} steps")
    print("(tokens/s: answer tokens, as the recipe logs them; peak GB: max_memory_allocated on a GPU, peak RSS on CPU)")
    print(f"{'packing':14s} {'s/step':>8s} {'tokens/s':>10s} {'peak GB':>9s} {'model GB':>9s} {'error':>7s}")
    stats = {}
    for packing, rows in runs.items():
        s = stats[packing] = summarize(rows)
        model = predicted_gb(checkpoint, data_file, a.size, packing)
        error = (model - s["peak_gb"]) / s["peak_gb"] if a.device.startswith("cuda") else float("nan")
        print(f"{packing:14s} {s['step_s']:8.2f} {s['tokens_per_s']:10.0f} {s['peak_gb']:9.2f} {model:9.2f} "
              f"{error * 100:+6.0f}%")
        if a.device.startswith("cuda") and abs(error) > a.memory_tolerance:
            failures.append(f"memory model off by {error * 100:+.0f} % with packing={packing}")
    pairs = list(zip(runs["none"], runs["shared_prompt"]))
    diffs = [abs(x["loss"] - y["loss"]) for x, y in pairs]
    # The log-probs are the sharper test: at the config's lr 1e-7 the loss barely leaves ln 2.
    logp_diffs = [abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in pairs for k in x if k.startswith("logps/")]
    print(f"largest |loss difference| over {len(diffs)} steps: {max(diffs):.2e} (tolerance {a.loss_tolerance:g})")
    print(f"largest relative log-prob difference (chosen, rejected, noise): {max(logp_diffs):.2e} "
          f"(tolerance {a.logp_tolerance:g})")
    speedup = stats["shared_prompt"]["tokens_per_s"] / stats["none"]["tokens_per_s"]
    print(f"shared_prompt / none tokens/s: {speedup:.2f}x")
    if len(diffs) != a.steps or max(diffs) > a.loss_tolerance:
        failures.append(f"losses differ by up to {max(diffs):.2e}")
    if not logp_diffs or max(logp_diffs) > a.logp_tolerance:
        failures.append(f"log-probs differ by up to {max(logp_diffs, default=float('nan')):.2e} (relative)")
    print(f"total {time.perf_counter() - start:.0f} s")
    print("gpu_check: ok" if not failures else f"gpu_check: FAILED ({'; '.join(failures)})")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
