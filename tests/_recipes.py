"""Running a training recipe in a test, as a user would: through its config and overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torchtune.training.metric_logging import DiskLogger

from povid.loss import POVIDLoss, PreferenceLogProbs


def metrics(output_dir: str | Path) -> List[Dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def run_recipe(main: Callable, config: str, ckpt: Path, data: Path, out: Path, *overrides: str) -> List[Dict[str, Any]]:
    """``tune run <recipe> --config <config> checkpoint_dir=... data_file=... output_dir=...``;
    returns the run's metrics rows."""
    main(["--config", config, f"checkpoint_dir={ckpt}", f"data_file={data}", f"output_dir={out}", *overrides])
    return metrics(out)


class CrashingLogger(DiskLogger):
    """A metric logger (the config's ``metric_logger`` block) that raises after logging step
    ``crash_at_step``: a crash in the middle of a run, through the public config surface."""

    def __init__(self, log_dir: str, crash_at_step: int, **kwargs: Any) -> None:
        super().__init__(log_dir, **kwargs)
        self.crash_at_step = crash_at_step

    def log_dict(self, payload: Dict[str, Any], step: int) -> None:
        super().log_dict(payload, step)
        if step == self.crash_at_step:
            raise KeyboardInterrupt(f"simulated crash after step {step}")


def crash_at(step: int) -> List[str]:
    """Overrides that make a run crash right after logging ``step``."""
    return ["metric_logger._component_=_recipes.CrashingLogger", f"metric_logger.crash_at_step={step}"]


class NaNLoss(POVIDLoss):
    """The config's ``loss`` block made to return NaN at its ``nan_at_call``-th call: a run
    that diverges, through the public config surface."""

    def __init__(self, nan_at_call: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, logprobs: PreferenceLogProbs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        self.calls += 1
        loss, metrics = super().forward(logprobs)
        return (loss * float("nan") if self.calls == self.nan_at_call else loss), metrics


def recipe_after_setup(recipe_cls: type, config: str, ckpt: Path, data: Path, out: Path, *overrides: str):
    """A recipe built from its config and set up, as ``main`` does before training."""
    from povid.config import load_config

    cfg = load_config(["--config", config, f"checkpoint_dir={ckpt}", f"data_file={data}", f"output_dir={out}", *overrides])
    recipe = recipe_cls(cfg)
    recipe.setup()
    return recipe
