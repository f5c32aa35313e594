"""Does a low-precision povid_dpo run take the updates an fp32 run takes, and keep them on merge?

    python benchmarks/precision_check.py                          # CPU, tiny LLaVA (~1 min)
    python benchmarks/precision_check.py --device cuda --steps 2000   # the check on a GPU

Three LoRA runs of ``povid_dpo`` at POVID's lr 1e-7 on the same data: fp32; ``dtype`` (bf16 by
default) compute with fp32 trainable parameters (the recipe's default); and pure ``dtype``
training (``trainable_dtype`` = ``dtype``, what the recipe did before). It prints the relative L2
distance of each run's adapter updates to the fp32 run's, how far LoRA-A and LoRA-B moved next to
fp32 (norm ratio, share of elements moved) and the cosine of the updates; then how much of a
LoRA delta of about 1e-5 the merged checkpoint of a ``dtype`` run keeps.
``tests/test_precision.py`` runs it at CPU size and asserts: movement within 5 % of fp32's for
both matrices, cosine >= 0.9, and >= 99 % of the merged delta kept. (The element-wise distance is
not a useful bar: bf16 compute alone, which the released run has too, turns Adam's near-sign
updates of weakly driven elements: 0.24 relative L2 at cosine 0.97 on the tiny model.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import torch

__all__ = ["adapter_updates", "relative_l2", "movement", "merged_delta_kept", "main"]


def _recipe(ckpt: Path, data: Path, out: Path, *overrides: str):
    import povid_dpo
    from povid.config import load_config

    cfg = load_config(
        ["--config", "povid_tiny_lora", f"checkpoint_dir={ckpt}", f"data_file={data}", f"output_dir={out}",
         *overrides]
    )  # fmt: skip
    return povid_dpo.POVIDDPORecipe(cfg)


def _trainable(recipe) -> Dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in recipe.model.named_parameters() if n in recipe.trainable}


def adapter_updates(ckpt: Path, data: Path, out: Path, *overrides: str) -> Dict[str, torch.Tensor]:
    """Train ``povid_dpo`` (LoRA) with ``overrides``; returns each adapter's change, in fp32."""
    recipe = _recipe(ckpt, data, out, *overrides)
    recipe.setup()
    before = _trainable(recipe)
    recipe.train()
    recipe.cleanup()
    after = _trainable(recipe)
    return {n: after[n] - before[n] for n in before}


def relative_l2(values: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> float:
    """``||values - reference|| / ||reference||`` over all tensors together."""
    num = sum(float((values[n].double() - reference[n].double()).pow(2).sum()) for n in reference)
    den = sum(float(reference[n].double().pow(2).sum()) for n in reference)
    return (num / den) ** 0.5


def _norm(values: Dict[str, torch.Tensor]) -> float:
    return sum(float(v.double().pow(2).sum()) for v in values.values()) ** 0.5


def movement(values: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """How far ``values`` (adapter updates) moved next to ``reference``'s: for LoRA-A and LoRA-B
    apart, the ratio of the L2 norms (1.0: as far) and the share of elements that moved at all;
    over all adapters, the cosine of the two updates (1.0: the same direction)."""
    out: Dict[str, float] = {}
    for part in ("lora_a", "lora_b"):
        keys = [k for k in reference if f".{part}." in k]
        out[f"{part}_norm_ratio"] = _norm({k: values[k] for k in keys}) / _norm({k: reference[k] for k in keys})
        out[f"{part}_moved"] = sum(int((values[k] != 0).sum()) for k in keys) / sum(values[k].numel() for k in keys)
    dot = sum(float((values[k].double() * reference[k].double()).sum()) for k in reference)
    out["cosine"] = dot / (_norm(values) * _norm(reference))
    return out


def merged_delta_kept(ckpt: Path, data: Path, out: Path, *overrides: str, size: float = 1e-5) -> float:
    """Set every LoRA delta ``(alpha / r) B A`` of a fresh recipe to entries of about ``size``,
    save its merged model and reload it: returns the share of the delta the saved weights keep
    (1 - relative L2 error of merged minus base)."""
    from povid.checkpoint import LlavaCheckpointer

    recipe = _recipe(ckpt, data, out, "max_steps=1", *overrides)
    recipe.setup()
    scale = recipe.cfg.model.lora_alpha / recipe.cfg.model.lora_rank
    generator = torch.Generator().manual_seed(0)
    expected = {}
    with torch.no_grad():
        for name, module in recipe.model.named_modules():
            if hasattr(module, "lora_b"):
                a = module.lora_a.weight.float().cpu()
                b = torch.randn(module.lora_b.weight.shape, generator=generator)
                b *= size / float((scale * b @ a).abs().mean())
                module.lora_b.weight.copy_(b)
                expected[f"{name}.weight"] = scale * module.lora_b.weight.float().cpu() @ a
    recipe.save_checkpoint(final=True)
    recipe.cleanup()
    base = LlavaCheckpointer(ckpt).load_checkpoint()["model"]
    merged = LlavaCheckpointer(Path(out) / "final" / "model").load_checkpoint()["model"]
    got = {k: merged[k].double() - base[k].double() for k in expected}
    return 1.0 - relative_l2(got, expected)


def main(argv: Sequence[str] | None = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a llava-hf checkpoint (default: a tiny random one)")
    parser.add_argument("--data", type=Path, help="a POVID preference file (default: 16 shape images)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-7)
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)

    work = args.out or Path(tempfile.mkdtemp(prefix="precision_check_"))
    ckpt, data = args.checkpoint, args.data
    if ckpt is None or data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _shapes import save_shape_image
        from _tiny import make_tiny_checkpoint

        ckpt = ckpt or make_tiny_checkpoint(work / "checkpoint", seed=0)
        if data is None:
            data = work / "data" / "preferences.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            for i in range(16):
                colour, shape = save_shape_image(data.parent / f"{i}.png", i)
                turns = lambda answer: [{"from": "human", "value": "<image>\nDescribe this image."},  # noqa: E731
                                        {"from": "gpt", "value": answer}]  # fmt: skip
                rows.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns(f"A {colour} {shape}."),
                             "rejected_conversations": turns(f"A {colour} {shape} and a dog.")})  # fmt: skip
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = (f"optimizer.lr={args.lr}", f"max_steps={args.steps}", "batch_size=2", "save_merged=false",
           "clip_grad_norm=null", f"device={args.device}")  # fmt: skip
    fp32 = adapter_updates(ckpt, data, work / "fp32", *run, "dtype=fp32")
    mixed = adapter_updates(ckpt, data, work / "mixed", *run, f"dtype={args.dtype}")
    pure = adapter_updates(ckpt, data, work / "pure", *run, f"dtype={args.dtype}", f"trainable_dtype={args.dtype}")
    result = {
        "steps": args.steps,
        "lr": args.lr,
        f"{args.dtype}_fp32_master_vs_fp32": {"relative_l2": relative_l2(mixed, fp32), **movement(mixed, fp32)},
        f"pure_{args.dtype}_vs_fp32": {"relative_l2": relative_l2(pure, fp32), **movement(pure, fp32)},
        "merged_delta_kept": merged_delta_kept(ckpt, data, work / "merge", f"dtype={args.dtype}", f"device={args.device}"),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
