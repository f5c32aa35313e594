"""GPU memory of the shipped povid_dpo configs, from ``povid.memory``, checked on CPU.

    python benchmarks/memory_model.py               # table + CPU check (~5 min on 2 cores)
    python benchmarks/memory_model.py --no-check    # table only (seconds)
    python benchmarks/memory_model.py --markdown    # tables as Markdown (README)
    python benchmarks/memory_model.py --no-check --write-headers   # '# Memory:' lines of the configs

1. Reads the shipped YAML configs (``recipe_configs/povid_{7b,13b}_*.yaml``) and prints the
   estimated peak memory per GPU by component for LLaVA-1.5-7B / 13B (the architecture is taken
   from the config name; everything else -- method, LoRA rank and dropout, batch, rows,
   ``max_seq_len``, dtype, activation checkpointing, noise source, precompute -- from the YAML).
   The recipe's output head runs on answer tokens only (LLaVA-style answers of up to
   ``ANSWER_LEN`` tokens behind a ``PROMPT_LEN``-token prompt); the column ``other packing`` is
   the total with the config's ``packing`` switched (``none`` <-> ``shared_prompt``).
2. Checks the model against peak RSS measured on CPU: povid_dpo runs a few small
   configurations of the ~100 M benchmark model (fp32, each in its own process, see
   ``_worker.py``) with glibc's heap trimming made eager (``MALLOC_MMAP_THRESHOLD_=131072``) so
   that RSS follows live tensors the way ``torch.cuda.max_memory_allocated`` does. Measured:
   training peak minus the RSS after setup; predicted: total minus parameters. Parameters are
   checked as RSS after setup minus RSS after the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

CONFIGS = [
    "povid_7b_lora", "povid_7b_qlora", "povid_7b_full", "povid_13b_lora",
    "povid_7b_lora_stage1", "povid_7b_lora_stage2",
]  # fmt: skip
COMPONENTS = ["parameters", "gradients", "optimizer", "activations", "logits", "reference", "fsdp_buffers"]
GPUS = [24, 40, 48, 80]
# LLaVA-1.5's rows: 576 image placeholders + BOS, the vicuna_v1 system prompt and a question
# (~630 tokens), then an answer of 100 to 250 tokens (the upper end counted).
PROMPT_LEN = 630
ANSWER_LEN = 256


def config_settings(name: str) -> dict:
    """Everything ``estimate_memory`` needs, read from a shipped config."""
    from omegaconf import OmegaConf

    from povid.model import LLAVA_1_5_7B, LLAVA_1_5_13B

    cfg = OmegaConf.load(_common.ROOT / "recipe_configs" / f"{name}.yaml")
    model = cfg.model
    full = "lora" not in model._component_
    method = "full" if full else ("qlora" if model.get("quantize_base") else "lora")
    objective = cfg.loss.objective
    noise = cfg.noise.source
    uses_noise = objective != "dpo"
    # Dataset noise answers are a third row whenever the dataset has them (even for dpo).
    rows = 3 if noise == "dataset" else 2
    # Full fine-tuning of 7B is sharded (the config says 8 GPUs); LoRA runs on one.
    world = 8 if full else 1
    return dict(
        name=name,
        args=LLAVA_1_5_13B if "13b" in name else LLAVA_1_5_7B,
        size="13B" if "13b" in name else "7B",
        method=method,
        lora_rank=0 if full else int(model.lora_rank),
        # disable_dropout (the default) turns LoRA's dropout off during preference training.
        lora_dropout=0.0 if full or cfg.get("disable_dropout", True) else float(model.lora_dropout),
        lora_attn_modules=tuple(model.get("lora_attn_modules", ["q_proj", "k_proj", "v_proj", "output_proj"])),
        apply_lora_to_mlp=bool(model.get("apply_lora_to_mlp", True)),
        apply_lora_to_output=bool(model.get("apply_lora_to_output", False)),
        projector_trainable=bool(model.get("projector_trainable", False)),
        batch_size=int(cfg.batch_size),
        seq_len=int(cfg.max_seq_len),
        rows_per_example=rows,
        dtype=str(cfg.dtype),
        trainable_dtype=str(cfg.get("trainable_dtype") or "fp32"),
        activation_checkpointing=bool(cfg.enable_activation_checkpointing),
        world_size=world,
        precomputed_reference=bool(cfg.reference.precompute),
        online_noise=noise == "online" and uses_noise,
        objective=objective,
        packing=str(cfg.get("packing", "none")),
        gradient_accumulation_steps=int(cfg.gradient_accumulation_steps),
    )


def estimate_for(settings: dict, **overrides) -> dict:
    from povid.memory import estimate_memory

    keys = ["method", "lora_rank", "batch_size", "seq_len", "rows_per_example", "dtype", "trainable_dtype",
            "activation_checkpointing", "world_size", "precomputed_reference", "online_noise",
            "lora_dropout", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output",
            "projector_trainable", "packing", "gradient_accumulation_steps"]  # fmt: skip
    kwargs = {k: settings[k] for k in keys if k in settings}
    kwargs.setdefault("logits_positions", "answer")
    kwargs.setdefault("answer_len", ANSWER_LEN)
    kwargs.setdefault("prompt_len", PROMPT_LEN)
    kwargs.update(overrides)
    if kwargs["method"] == "full":
        kwargs["lora_rank"] = 8  # unused
    return estimate_memory(settings["args"], **kwargs)


def fits(total_gb: float) -> str:
    """Smallest common GPU with room for the estimate + CUDA context (1 GB) + 10 % slack."""
    need = total_gb * 1.1 + 1.0
    for size in GPUS:
        if need <= size:
            return f"{size} GB"
    return f"> {GPUS[-1]} GB"


def config_table(markdown: bool) -> list:
    rows = []
    for name in CONFIGS:
        s = config_settings(name)
        est = estimate_for(s)
        other = estimate_for(s, packing="none" if s["packing"] == "shared_prompt" else "shared_prompt")
        rows.append((s, est, other))
    head = ["config", "model", "method", "GPUs", "batch x rows x tokens", "AC",
            *[c.replace("_buffers", "") for c in COMPONENTS], "total", "peak in", "packing", "other packing", "fits"]  # fmt: skip
    lines = []
    for s, est, other in rows:
        lines.append([
            s["name"], s["size"], s["method"] + (f" r{s['lora_rank']}" if s["method"] != "full" else ""),
            str(s["world_size"]),
            f"{s['batch_size']} x {s['rows_per_example']}{'+noise' if s['online_noise'] else ''} x {s['seq_len']}",
            "on" if s["activation_checkpointing"] else "off",
            *[f"{est[c]:.2f}" for c in COMPONENTS], f"{est['total']:.1f}", peak_phase(est), s["packing"],
            f"{other['total']:.1f}",
            fits(est["total"]),
        ])  # fmt: skip
    _print_table(head, lines, markdown)
    return rows


def peak_phase(est: dict) -> str:
    """The phase of the step whose total is the peak: forward, backward or optimizer step."""
    return max(("forward", "backward", "optimizer_step"), key=lambda k: est[k]).replace("_", " ")


def _print_table(head, lines, markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def header_line(settings: dict, est: dict) -> str:
    """The ``# Memory:`` lines written into a config header."""
    where = "per GPU with 8-way FSDP" if settings["world_size"] > 1 else "on one GPU"
    parts = ", ".join(
        f"{label} {est[key]:.1f}"
        for key, label in [("parameters", "weights"), ("gradients", "grads"), ("optimizer", "AdamW"),
                           ("activations", "activations"), ("logits", "logits"),
                           ("reference", "reference"), ("fsdp_buffers", "FSDP")]
        if est[key] >= 0.05
    )  # fmt: skip
    if settings["packing"] == "shared_prompt":
        shape = f"{settings['rows_per_example']} rows of {ANSWER_LEN} answer tokens behind one {PROMPT_LEN}-token prompt"
    else:
        shape = f"{settings['rows_per_example']} rows x {settings['seq_len']} tokens"
    phase = peak_phase(est)
    return (
        f"# Memory: ~{est['total']:.0f} GB {where} (+ CUDA context) at batch {settings['batch_size']} x "
        f"{shape},\n"
        f"#   GB: {parts}\n"
        f"#   (each at its own high point; the peak is in the {phase}: povid.memory, printed by\n"
        f"#   benchmarks/memory_model.py)."
    )


def write_headers(rows) -> None:
    """Replace the ``# Memory:`` line (and its continuation) of each shipped config."""
    for s, est, _ in rows:
        path = _common.ROOT / "recipe_configs" / f"{s['name']}.yaml"
        lines = path.read_text().splitlines(keepends=True)
        out, i = [], 0
        while i < len(lines):
            if lines[i].startswith("# Memory:"):
                out.append(header_line(s, est) + "\n")
                i += 1
                while i < len(lines) and lines[i].startswith("#   "):  # our own continuation
                    i += 1
                continue
            out.append(lines[i])
            i += 1
        path.write_text("".join(out))


# ------------------------------------------------------------------------------------- check

CHECKS = [
    # (label, worker args, estimate overrides)
    ("LoRA dpo, AC off", [], {}),
    ("LoRA dpo, AC on", ["--ac"], {"activation_checkpointing": True}),
    ("LoRA dpo, batch 1, 512 tok", ["--batch", "1", "--seq-len", "512"], {"batch_size": 1, "seq_len": 512}),
    ("LoRA dpo, batch 1, 2048 tok", ["--batch", "1", "--seq-len", "2048"], {"batch_size": 1, "seq_len": 2048}),
    ("LoRA povid, dataset noise", ["--objective", "povid", "--noise", "dataset"], {"rows_per_example": 3}),
    ("LoRA povid_ref, online noise", ["--objective", "povid_released", "--noise", "online"], {"online_noise": True}),
    ("LoRA dpo, precomputed ref", ["--precompute"], {"precomputed_reference": True}),
    ("full dpo, AC off", ["--method", "full"], {"method": "full", "projector_trainable": True}),
    ("LoRA dpo, packed", ["--cfg", "packing=shared_prompt"], {"packing": "shared_prompt"}),
    ("LoRA povid, dataset noise, packed", ["--objective", "povid", "--noise", "dataset", "--cfg", "packing=shared_prompt"],
     {"rows_per_example": 3, "packing": "shared_prompt"}),
    ("LoRA dpo, packed, batch 1, 2048 tok", ["--batch", "1", "--seq-len", "2048", "--cfg", "packing=shared_prompt"],
     {"batch_size": 1, "seq_len": 2048, "packing": "shared_prompt"}),
]


def run_checks(preset: str, workdir: str, threads: int, markdown: bool) -> list:
    spec = _common.PRESETS[preset]
    ws = _common.prepare_workspace(spec, seq_len=256, n_records=4, workdir=Path(workdir))
    from povid_data.tokenizer import LlavaTokenizer

    tokenizer = LlavaTokenizer.from_dir(ws.checkpoint_dir)
    args = _common.llava_args(spec, tokenizer.vocab_size)
    # The benchmark's rows are cut to exactly seq_len tokens: prompt, then the answer.
    prompt_len = _common.prompt_tokens(tokenizer, spec.num_image_tokens)
    base = dict(args=args, method="lora", lora_rank=8, batch_size=2, seq_len=256, rows_per_example=2,
                dtype="fp32", activation_checkpointing=False, world_size=1, precomputed_reference=False,
                online_noise=False, lora_dropout=0.0, lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"),
                apply_lora_to_mlp=True, apply_lora_to_output=False, projector_trainable=False)  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = []
    for label, worker_args, overrides in CHECKS:
        cmd = [sys.executable, str(Path(__file__).with_name("_worker.py")), "--side", "ours",
               "--preset", preset, "--warmup", "1", "--steps", "1", "--threads", str(threads),
               "--workdir", workdir, *worker_args]  # fmt: skip
        measured = _run_worker(cmd, env)
        point = {**base, **overrides}
        # On CPU AdamW steps tensor by tensor (PyTorch's default there; on CUDA it is foreach).
        est = estimate_for(point, prompt_len=prompt_len, answer_len=point["seq_len"] - prompt_len,
                           optimizer_foreach=False)  # fmt: skip
        # Setup makes the weights and the reference's frozen copies (full: the whole model).
        predicted_static = est["parameters"] + est["reference"]
        predicted_train = est["total"] - predicted_static
        measured_train = measured["train_peak_gb"] - measured["static_gb"]
        measured_static = measured["static_gb"] - measured["runtime_gb"]
        results.append((label, measured_static, predicted_static, measured_train, predicted_train, measured))
        print(f"  measured {label}: train +{measured_train:.2f} GB (predicted +{predicted_train:.2f})", flush=True)
    head = ["CPU check (fp32, ~100 M model)", "weights measured", "weights model", "step measured",
            "step model", "error"]  # fmt: skip
    lines = []
    for label, ms, ps, mt, pt, _ in results:
        lines.append([label, f"{ms:.2f}", f"{ps:.2f}", f"{mt:.2f}", f"{pt:.2f}", f"{(pt - mt) / mt * 100:+.0f} %"])
    _print_table(head, lines, markdown)
    return results


def _run_worker(cmd, env) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"worker failed: {' '.join(cmd)}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-check", action="store_true", help="only the table for the shipped configs")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--headers", action="store_true", help="print the '# Memory:' config header lines")
    p.add_argument("--write-headers", action="store_true", help="write them into recipe_configs/*.yaml")
    p.add_argument("--preset", default="small", help="benchmark model of the CPU check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=str(_common.DEFAULT_WORKDIR))
    a = p.parse_args(argv)
    print("Estimated peak memory per GPU, GB (povid.memory; torch allocations, CUDA context not included)")
    rows = config_table(a.markdown)
    if a.headers:
        for s, est, _ in rows:
            print(f"{s['name']}:\n{header_line(s, est)}")
    if a.write_headers:
        write_headers(rows)
    if not a.no_check:
        print("\nCheck against peak RSS measured on CPU (povid_dpo, 2 steps per configuration)")
        run_checks(a.preset, a.workdir, a.threads, a.markdown)


if __name__ == "__main__":
    main()
