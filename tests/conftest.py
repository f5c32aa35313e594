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
