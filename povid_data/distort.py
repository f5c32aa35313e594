"""Stage-2 image distortion: forward-diffusion noise on the image, the POVID way.

The noised image is (design notes, section 1)::

    x_t = sqrt(abar_t) * x + sqrt(1 - abar_t) * eps,     eps ~ N(0, I)
    beta = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    abar_t = cumprod(1 - beta)[t]                        (t counted from 0, as the reference does)

with T = 1000, beta_start = 1e-5, beta_end = 5e-3 and t = 500 by default: about
``0.8630 * x + 0.5052 * eps``.

Exactly what is computed (the contract that makes a distorted image reproducible):

- ``x`` is the RGB image at its native resolution, before any padding or CLIP preprocessing,
  as ``float32`` ``uint8 / 255`` in ``[3, H, W]`` layout (torchvision's ``ToTensor``, which the
  reference code uses);
- ``eps`` is ``torch.randn((3, H, W), dtype=float32, generator=g)``; for stage-2 data ``g`` is a
  CPU ``torch.Generator`` seeded with :func:`noise_seed` ``(record id, seed)``, so the noise
  depends only on the id and the seed (not on batch, order, device or resume point);
- the coefficients are computed in float64 and applied to the float32 tensors;
- back to bytes, ``overflow="clamp"`` (default): clamp to [0, 1], multiply by 255, truncate
  toward zero. ``overflow="wrap"``: multiply by 255, truncate toward zero, wrap modulo 256 —
  bit for bit what the reference's ``mul(255).byte()`` (torchvision ``ToPILImage``) produces
  on CPU, where a pixel pushed just below 0 comes back almost white. Both truncate rather than
  round, so the two modes give the same byte wherever the noisy value stays inside [0, 1].

:func:`distort_pixels` is the tensor-level entry point (online distortion during training,
with fresh noise from a running generator); :func:`distort_image` wraps it for PIL images.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import PIL.Image
import torch

__all__ = [
    "NoiseSettings",
    "NUM_STEPS",
    "BETA_START",
    "BETA_END",
    "DEFAULT_STEP",
    "OVERFLOW_MODES",
    "noise_schedule",
    "noise_coefficients",
    "noise_seed",
    "online_noise_seed",
    "RecordNoise",
    "noise_generator",
    "add_noise",
    "to_uint8",
    "distort_pixels",
    "pil_to_unit",
    "uint8_to_pil",
    "distort_image",
]

NUM_STEPS = 1000
BETA_START = 1e-5
BETA_END = 5e-3
DEFAULT_STEP = 500
OVERFLOW_MODES = ("clamp", "wrap")


def noise_schedule(
    num_steps: int = NUM_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """The sigmoid beta schedule, ``float64`` of shape ``[num_steps]``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)
    return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start


@functools.lru_cache(maxsize=64)
def noise_coefficients(
    step: int,
    num_steps: int = NUM_STEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> Tuple[float, float]:
    """``(sqrt(abar_step), sqrt(1 - abar_step))`` for a step counted from 0.

    Cached: online distortion asks for the same step every training step.
    """
    step = operator.index(step)  # an int (numpy ints too); a float step is a mistake
    if not 0 <= step < num_steps:
        raise ValueError(f"noise step must be in [0, {num_steps - 1}], got {step}")
    abar = torch.cumprod(1.0 - noise_schedule(num_steps, beta_start, beta_end), dim=0)[step]
    return float(abar.sqrt()), float((1.0 - abar).sqrt())


def noise_seed(record_id: object, seed: int) -> int:
    """A 63-bit seed for one record's noise, stable across runs, machines and Python versions.

    SHA-256 of ``"{seed}:{record_id}"`` (Python's ``hash()`` is salted per process). The id is
    taken as text, so ``123`` and ``"123"`` share their noise, as they share their output line.
    """
    digest = hashlib.sha256(f"{int(seed)}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_generator(record_id: object, seed: int) -> torch.Generator:
    """The CPU generator that draws a record's noise (CPU so that every device gets the same)."""
    return torch.Generator(device="cpu").manual_seed(noise_seed(record_id, seed))


def add_noise(x01: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar) * x01 + sqrt(1 - abar) * noise`` in float32, no clamping (may leave [0, 1])."""
    if noise.shape != x01.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from image shape {tuple(x01.shape)}")
    signal, spread = noise_coefficients(step)
    return signal * x01.float() + spread * noise.to(x01.device, torch.float32)


def to_uint8(x: torch.Tensor, overflow: str = "clamp") -> torch.Tensor:
    """Float pixels in [0, 1] scale -> ``uint8``, handling values outside [0, 1].

    ``clamp``: ``trunc(clamp(x, 0, 1) * 255)``. ``wrap``: ``trunc(x * 255) mod 256``, the
    reference's ``mul(255).byte()`` written out so it does not rely on a platform's
    float-to-uint8 cast of out-of-range values (undefined in C).
    """
    if overflow == "clamp":
        return x.clamp(0.0, 1.0).mul(255.0).trunc().to(torch.uint8)
    if overflow == "wrap":
        return x.mul(255.0).trunc().to(torch.int64).remainder(256).to(torch.uint8)
    raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}; got {overflow!r}")


def distort_pixels(
    x01: torch.Tensor,
    step: int = DEFAULT_STEP,
    *,
    generator: Optional[torch.Generator] = None,
    overflow: str = "clamp",
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Noise an image tensor in [0, 1] (any shape, e.g. ``[3, H, W]``) and return ``uint8``.

    Args:
        x01: float pixels in [0, 1] at native resolution.
        step: diffusion step, 0-based (500 in POVID).
        generator: draws ``eps`` (``torch.randn`` in float32, on the generator's device, then
            moved to ``x01``'s); None uses the global RNG. Ignored when ``noise`` is given.
        overflow: ``clamp`` or ``wrap`` (see :func:`to_uint8`).
        noise: use this ``eps`` instead of drawing one.
    """
    if not x01.is_floating_point():
        raise TypeError(f"expected float pixels in [0, 1], got {x01.dtype}")
    if overflow not in OVERFLOW_MODES:  # checked before drawing, so a typo costs no noise
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}; got {overflow!r}")
    if noise is None:
        device = generator.device if generator is not None else x01.device
        noise = torch.randn(x01.shape, generator=generator, dtype=torch.float32, device=device)
    return to_uint8(add_noise(x01, step, noise), overflow)


def pil_to_unit(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``float32`` ``[3, H, W]`` = ``uint8 / 255`` (torchvision ``ToTensor``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255.0)


def uint8_to_pil(pixels: torch.Tensor) -> PIL.Image.Image:
    """``uint8`` ``[3, H, W]`` -> RGB PIL image."""
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy())


def distort_image(
    image: PIL.Image.Image,
    step: int = DEFAULT_STEP,
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    overflow: str = "clamp",
) -> PIL.Image.Image:
    """The noised copy of an image, same size, RGB.

    Give ``seed`` (e.g. ``noise_seed(record_id, seed)``) for a reproducible image, or a running
    ``generator`` for fresh noise on every call (online distortion); neither uses the global RNG.
    """
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    return uint8_to_pil(distort_pixels(pil_to_unit(image), step, generator=generator, overflow=overflow))


def online_noise_seed(record_id: object, epoch: int, seed: int) -> int:
    """The seed of a record's online noise in ``epoch``: fresh every epoch, yet the same in every
    run, batch and resume. ``povid_dpo`` (online noise) and ``povid_audit`` (``noise.source:
    online``, epoch 0) draw the noisy image from it, so the audit sees what training saw first."""
    return noise_seed(f"{record_id}@epoch{epoch}", seed)


@dataclass(frozen=True)
class RecordNoise:
    """The noised copy of a record's image, as a preference dataset asks for it
    (``noise(image, record_id, epoch)``).

    A plain picklable object (DataLoader workers under spawn get a copy of it, not of a recipe).
    ``per_epoch=False``: the image ``povid_distort`` showed the model (seeded by id and its
    ``seed``, the same every epoch); ``per_epoch=True``: online noise, fresh each epoch
    (:func:`online_noise_seed`); ``fixed_epoch`` pins that epoch (the audit's one pass is epoch 0).
    """

    step: int
    overflow: str
    seed: int
    per_epoch: bool
    fixed_epoch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"noise overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")

    def __call__(self, image: PIL.Image.Image, record_id: object, epoch: int) -> PIL.Image.Image:
        if self.per_epoch:
            epoch = epoch if self.fixed_epoch is None else self.fixed_epoch
            seed = online_noise_seed(record_id, epoch, self.seed)
        else:
            seed = noise_seed(record_id, self.seed)
        return distort_image(image, self.step, seed=seed, overflow=self.overflow)


@dataclass(frozen=True)
class NoiseSettings:
    """``povid_dpo``'s ``noise`` block, with every branch it implies derived in one place.

    ``source``: ``dataset`` (``povid_distort``'s answers), ``online`` (the teacher-forced argmax
    on a noised image, fresh each epoch) or ``none``; ``condition``: score the noise answer on
    the ``clean`` image (the release) or the ``noisy`` one; ``argmax``: online, the reference
    scores the policy's answer (``shared``) or takes its own (``separate``). ``objective_uses_noise``:
    whether the loss has a noise term at all (``dpo`` has none).
    """

    source: str
    step: int
    overflow: str
    argmax: str
    condition: str
    stage2_seed: int
    objective_uses_noise: bool

    @classmethod
    def from_config(cls, noise: Any, *, objective_uses_noise: bool) -> "NoiseSettings":
        """From the config's ``noise`` block (a mapping with the fields above but the last)."""
        return cls(
            source=noise["source"], step=noise["step"], overflow=noise["overflow"], argmax=noise["argmax"],
            condition=noise["condition"], stage2_seed=noise["stage2_seed"], objective_uses_noise=objective_uses_noise,
        )  # fmt: skip

    @property
    def online(self) -> bool:
        """Noise answers computed in the step (and scored, the objective having a noise term)."""
        return self.source == "online" and self.objective_uses_noise

    @property
    def dataset_answers(self) -> bool:
        """Noise answers read from the preference file."""
        return self.source == "dataset"

    @property
    def noisy_dataset_rows(self) -> bool:
        """Dataset noise answers scored on the image ``povid_distort`` showed the model."""
        return self.source == "dataset" and self.condition == "noisy"

    @property
    def reference_shares_argmax(self) -> bool:
        """Online: the reference scores the policy's noise answer."""
        return self.argmax == "shared"

    def image_noise(self, seed: int) -> Optional["RecordNoise"]:
        """The noised image a preference dataset should add to each item, or None: online,
        fresh every epoch (from the run's ``seed``); for noisy dataset rows, the very image
        ``povid_distort`` used (``stage2_seed``)."""
        if self.source == "online":
            return RecordNoise(step=self.step, overflow=self.overflow, per_epoch=True, seed=seed)
        if self.condition == "noisy":
            return RecordNoise(step=self.step, overflow=self.overflow, per_epoch=False, seed=self.stage2_seed)
        return None
