"""The offline default: the whole job on CPU with nothing downloaded.

Until the synthetic-world demo lands, this makes a tiny random LLaVA checkpoint and a few
synthetic images, then answers them with ``tune run povid_generate`` exactly as a user would
with a real checkpoint. A rerun reuses the checkpoint and the finished generations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["make_demo_images", "run_demo"]

_SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


def make_demo_images(image_dir: Path) -> list[dict]:
    """Draw one coloured shape per image (non-square, to exercise padding); returns records."""
    from PIL import Image, ImageDraw

    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (colour, shape) in enumerate(_SHAPES):
        image = Image.new("RGB", (64 + 16 * i, 48), "white")
        draw = ImageDraw.Draw(image)
        box = (8 + 8 * i, 8, 40 + 8 * i, 40)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
        name = f"{i:03d}_{colour}_{shape}.png"
        image.save(image_dir / name)
        records.append({"id": f"demo-{i}", "image": name, "prompt": "Describe this image in detail."})
    return records


def _tune_executable() -> str:
    # The `tune` next to this interpreter, so the demo runs inside the same environment.
    candidate = Path(sys.executable).with_name("tune")
    return str(candidate) if candidate.exists() else (shutil.which("tune") or "tune")


def run_demo(output_dir: str | Path = "povid_outputs/demo", max_new_tokens: int = 24) -> Path:
    """Make the tiny checkpoint and images (once) and run ``povid_generate`` over them."""
    from povid.tiny import make_tiny_checkpoint

    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / "tiny_llava"
    if not (checkpoint_dir / "config.json").exists():
        print(f"[demo] writing a tiny random LLaVA checkpoint to {checkpoint_dir}", flush=True)
        make_tiny_checkpoint(checkpoint_dir)
    image_dir = output_dir / "images"
    records = make_demo_images(image_dir)
    data_file = output_dir / "records.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    command = [
        _tune_executable(), "run", "povid_generate", "--config", "llava_generate",
        f"checkpoint_dir={checkpoint_dir}", f"data_file={data_file}", f"image_dir={image_dir}",
        f"output_dir={output_dir}", f"max_new_tokens={max_new_tokens}", "batch_size=2",
    ]  # fmt: skip
    print("[demo] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out_file = output_dir / "generations.jsonl"
    print(f"[demo] {out_file}:")
    for line in out_file.read_text().splitlines():
        row = json.loads(line)
        print(f"  {row['id']} ({row['image']}): {row['response']!r}")
    print("[demo] the model is random, so its answers are noise; the pipeline is what is shown.")
    return out_file
