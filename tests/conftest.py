"""Shared fixtures: a tiny random LLaVA checkpoint (llava-hf layout) and small images."""

import numpy as np
import pytest
from PIL import Image

from povid.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaVA checkpoint written by our own saver (read-only for tests)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Three random RGB images of different, non-square sizes."""
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 30), (25, 50), (33, 33)]):
        path = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square"]


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory):
    """A small POVID preference file (16 records; noise answers on every other one) + images."""
    import json

    from PIL import ImageDraw

    directory = tmp_path_factory.mktemp("preferences")
    question = "<image>\nDescribe this image in detail."
    records = []
    for i in range(16):
        colour, shape = COLOURS[i % 4], SHAPES[(i // 4) % 2]
        image = Image.new("RGB", (40, 32), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((8, 6, 28, 26), fill=colour)
        image.save(directory / f"{i}.png")

        def turns(answer):
            return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

        record = {
            "id": f"r{i}",
            "image": f"{i}.png",
            "conversations": turns(f"There is a {colour} {shape} in the middle of the image."),
            "rejected_conversations": turns(f"There is a {colour} {shape} and a dog on the left."),
        }
        if i % 2 == 0:
            record["noise_conversations"] = turns(f"There is a purple {shape} at the top.")
        records.append(record)
    path = directory / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
