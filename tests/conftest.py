"""Shared fixtures: a tiny random LLaVA checkpoint (llava-hf layout) and small images."""

import numpy as np
import pytest
from PIL import Image

from _shapes import save_shape_image
from _tiny import make_tiny_checkpoint


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




@pytest.fixture(scope="session")
def preference_data(tmp_path_factory):
    """A small POVID preference file (16 records; noise answers on every other one) + images."""
    import json

    directory = tmp_path_factory.mktemp("preferences")
    question = "<image>\nDescribe this image in detail."
    records = []
    for i in range(16):
        colour, shape = save_shape_image(directory / f"{i}.png", i)

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
