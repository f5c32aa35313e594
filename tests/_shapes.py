"""Small test images: one coloured circle or square, the ``i``-th of a fixed cycle."""

from pathlib import Path
from typing import Tuple

from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square"]


def save_shape_image(path: Path, i: int) -> Tuple[str, str]:
    """Write image ``i`` (40 x 32, non-square) to ``path``; returns its ``(colour, shape)``."""
    colour, shape = COLOURS[i % 4], SHAPES[(i // 4) % 2]
    image = Image.new("RGB", (40, 32), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((8, 6, 28, 26), fill=colour)
    image.save(path)
    return colour, shape
