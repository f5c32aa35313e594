"""One benchmark configuration, run in its own process (peak RSS is per process).

Not meant to be run by hand: ``bench_vs_trl.py`` and ``bench_scaling.py`` start it and read
the last line it prints (``RESULT {json}``). Every configuration:

1. builds the model and data exactly as a user would (``povid_dpo``'s own setup from a packaged
   config with overrides, or TRL's ``DPOTrainer`` in vision-language mode);
2. resets the process's peak-RSS mark when training starts (after setup, so one-off loading
   peaks are not counted; the setup peak is reported separately);
3. runs ``warmup + steps`` optimizer steps through the trainer's own loop and times the steady
   steps between consecutive step ends (so data loading and collation count), in wall time and
   in process CPU time (with one thread, the time the process actually computed);
4. attributes time to vision tower, policy forward, reference pass, backward and optimizer
   with hooks (exclusive buckets; the remainder is data loading, loss and bookkeeping).

Ours runs the recipe as it is; ``--cfg packing=shared_prompt`` (any povid_dpo key) selects
its options. ``--answer-tokens LO HI`` draws every answer to a length in that range (LLaVA-style
data) instead of cutting every row to exactly ``--seq-len`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


class Timers:
    """Exclusive time buckets; nested regions are subtracted from their parents.

    ``clock`` is ``time.process_time`` for a one-thread process (CPU time: what the process
    computed, whatever else runs on the machine) or ``time.perf_counter`` (wall time).
    """

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.total = {}
        self._stack = []  # (name, start, child_time)
        self.in_backward = False

    @contextmanager
    def region(self, name: str):
        start = self.clock()
        self._stack.append([name, start, 0.0])
        try:
            yield
        finally:
            _, start, child = self._stack.pop()
            elapsed = self.clock() - start
            self.total[name] = self.total.get(name, 0.0) + elapsed - child
            if self._stack:
                self._stack[-1][2] += elapsed

    def hook_module(self, module, name: str) -> None:
        """Time every forward of ``module`` (outside backward recomputation) as ``name``."""
        entries = []

        def pre(mod, args, kwargs=None):
            if self.in_backward:
                entries.append(None)
                return
            ctx = self.region(name)
            ctx.__enter__()
            entries.append(ctx)

        def post(mod, args, output):
            ctx = entries.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def snapshot(self):
        return dict(self.total)


class StepClock:
    """Step-end timestamps; snapshots of the time buckets after warm-up and at the end."""

    def __init__(self, timers: Timers, warmup: int, steps: int) -> None:
        self.timers, self.warmup, self.steps = timers, warmup, steps
        self.stamps = []
        self.cpu_stamps = []
        self.snapshots = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if len(self.stamps) in (self.warmup, self.warmup + self.steps):
            self.snapshots.append(self.timers.snapshot())


def install_common_hooks(timers: Timers) -> None:
    """Backward and optimizer buckets (both frameworks use Tensor.backward and torch optimizers)."""
    import torch

    original_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        with timers.region("backward"):
            timers.in_backward = True
            try:
                return original_backward(self, *args, **kwargs)
            finally:
                timers.in_backward = False

    torch.Tensor.backward = backward
    opt_ctx = []

    def pre(optimizer, args, kwargs):
        ctx = timers.region("optimizer")
        ctx.__enter__()
        opt_ctx.append(ctx)

    def post(optimizer, args, kwargs):
        opt_ctx.pop().__exit__(None, None, None)

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


# --------------------------------------------------------------------------------- povid_dpo


def run_ours(a, ws, timers: Timers, clock: StepClock) -> dict:
    import povid_dpo
    from povid.config import load_config
    from povid.training import image_encoder

    runtime_gb = _common.rss_gb()  # interpreter + torch/torchtune/povid, before any model

    config = "povid_tiny_lora" if a.method == "lora" else "povid_tiny_full"
    out = tempfile.mkdtemp(prefix="povid_bench_out_")
    overrides = [
        f"checkpoint_dir={ws.checkpoint_dir}", f"data_file={ws.data_file}",
        f"image_dir={ws.image_dir}", f"output_dir={out}", f"batch_size={a.batch}",
        f"max_seq_len={a.seq_len}", "epochs=1", f"max_steps={a.warmup + a.steps}",
        "save_merged=false", f"loss.objective={a.objective}", f"noise.source={a.noise}",
        f"reference.precompute={str(a.precompute).lower()}",
        f"enable_activation_checkpointing={str(a.ac).lower()}", "log_every_n_steps=100000",
        f"seed={a.seed}",
    ]  # fmt: skip
    if a.method == "lora":
        overrides += [f"model.lora_rank={a.lora_rank}", f"model.lora_alpha={2 * a.lora_rank}"]
    overrides += a.cfg
    cfg = load_config(["--config", config, *overrides])

    Recipe = povid_dpo.POVIDDPORecipe
    from povid.training import TrainingLog

    original_log = TrainingLog.log

    def _log(self, step, metrics):  # called once at the end of every optimizer step
        clock.tick()
        original_log(self, step, metrics)

    TrainingLog.log = _log  # this worker process runs one recipe
    Recipe.save_checkpoint = lambda self, final=False: None  # not part of a step

    original_precompute = Recipe._precompute_reference
    precompute_s = {}

    def _precompute(self):
        start = time.perf_counter()
        result = original_precompute(self)
        precompute_s["value"] = time.perf_counter() - start
        return result

    Recipe._precompute_reference = _precompute

    original_reference = Recipe._reference_logps

    def _reference(self, *args, **kwargs):
        with timers.region("reference"):
            return original_reference(self, *args, **kwargs)

    original_policy = Recipe.preference_logprobs

    def _policy(self, batch):
        with timers.region("policy_forward"):
            return original_policy(self, batch)

    recipe = Recipe(cfg)
    setup_start = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - setup_start
    Recipe._reference_logps = _reference
    Recipe.preference_logprobs = _policy
    for model in (recipe.model, recipe.reference.frozen_copy):
        if model is not None:
            encoder = image_encoder(model)
            timers.hook_module(encoder.clip, "vision")
            timers.hook_module(encoder.projector, "vision")
    if recipe.reference.frozen_projector is not None:
        timers.hook_module(recipe.reference.frozen_projector, "vision")
    install_common_hooks(timers)
    n_params = sum(p.numel() for p in recipe.model.parameters())
    n_train = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
    rows_per_example = 3 if a.noise == "dataset" else 2
    return dict(
        trainer=lambda: recipe.train(),
        setup_s=setup_s,
        precompute_s=precompute_s,
        params=n_params,
        trainable=n_train,
        rows=rows_per_example * a.batch,
        cleanup=recipe.cleanup,
        runtime_gb=runtime_gb,
        output_dir=out,
    )


# --------------------------------------------------------------------------------- TRL


def _trl_dataset(ws, n: int):
    import datasets
    from PIL import Image

    rows = []
    for line in ws.data_file.read_text().splitlines()[:n]:
        record = json.loads(line)
        question = record["conversations"][0]["value"]
        rows.append({
            "image": Image.open(ws.image_dir / record["image"]).convert("RGB"),
            # The vicuna_v1 prompt povid_dpo builds; TRL adds no BOS itself (add_special_tokens=False).
            "prompt": f"<s>{_common.SYSTEM} USER: {question} ASSISTANT:",
            "chosen": f" {record['conversations'][1]['value']}</s>",
            "rejected": f" {record['rejected_conversations'][1]['value']}</s>",
        })  # fmt: skip
    return datasets.Dataset.from_list(rows)


def run_trl(a, ws, timers: Timers, clock: StepClock) -> dict:
    import torch
    import transformers
    import trl.trainer.utils as trl_utils
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    runtime_gb = _common.rss_gb()  # interpreter + torch/transformers/trl/peft, before any model
    torch.manual_seed(a.seed)
    setup_start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(str(ws.checkpoint_dir), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(ws.checkpoint_dir))
    peft_config = None
    if a.method == "lora":
        # Same adapters as povid_dpo: every LLM linear (attention q/k/v/o, MLP gate/up/down),
        # not the vision tower, projector or lm_head.
        peft_config = LoraConfig(
            r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0, bias="none",
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        )  # fmt: skip
    else:
        # As povid_dpo's full config: LLM + projector train, the vision tower stays frozen.
        model.model.vision_tower.requires_grad_(False)
    out = tempfile.mkdtemp(prefix="trl_bench_out_")
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps, learning_rate=1e-3 if a.method == "lora" else 1e-4,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=a.ac,
        logging_steps=100000, save_strategy="no", report_to="none", dataloader_num_workers=0,
        max_length=a.seq_len, beta=0.1, loss_type=["sigmoid"], seed=a.seed, disable_dropout=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=_trl_dataset(ws, a.batch * (a.warmup + a.steps)),
        processing_class=processor, peft_config=peft_config,
    )  # fmt: skip
    setup_s = time.perf_counter() - setup_start

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_train_begin(self, args, state, control, **kwargs):
            _common.reset_peak_rss()

    trainer.add_callback(Stamp())

    # Buckets: vision tower + projector, reference (no-grad backbone + no-grad fused head),
    # policy forward (the rest of compute_loss), backward, optimizer.
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    timers.hook_module(base.model.vision_tower, "vision")
    timers.hook_module(base.model.multi_modal_projector, "vision")
    backbones = [base.model] + ([trainer.ref_model.model] if trainer.ref_model is not None else [])
    if trainer.ref_model is not None:
        timers.hook_module(trainer.ref_model.model.vision_tower, "vision")
        timers.hook_module(trainer.ref_model.model.multi_modal_projector, "vision")

    def grad_bucket(bucket_if_no_grad: str, bucket_if_grad: str):
        return bucket_if_grad if torch.is_grad_enabled() else bucket_if_no_grad

    for backbone in backbones:
        entries = []

        def pre(mod, args, kwargs=None, _entries=entries):
            ctx = timers.region(grad_bucket("reference", "policy_forward")) if not timers.in_backward else None
            if ctx is not None:
                ctx.__enter__()
            _entries.append(ctx)

        def post(mod, args, output, _entries=entries):
            ctx = _entries.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)

        backbone.register_forward_pre_hook(pre)
        backbone.register_forward_hook(post)

    head = trl_utils._ChunkedLogProbFunction

    class TimedHead:
        @staticmethod
        def apply(*args):
            with timers.region(grad_bucket("reference", "policy_forward")):
                return head.apply(*args)

    trl_utils._ChunkedLogProbFunction = TimedHead
    original_compute_loss = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        with timers.region("policy_forward"):
            return original_compute_loss(*args, **kwargs)

    trainer.compute_loss = compute_loss
    install_common_hooks(timers)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return dict(
        trainer=lambda: trainer.train(),
        setup_s=setup_s,
        precompute_s={},
        params=n_params,
        trainable=n_train,
        rows=2 * a.batch,
        cleanup=lambda: None,
        runtime_gb=runtime_gb,
        output_dir=out,
    )


# --------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "trl"], required=True)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--objective", default="dpo", choices=["dpo", "povid", "povid_released"])
    p.add_argument("--noise", default="none", choices=["none", "dataset", "online"])
    p.add_argument("--precompute", action="store_true")
    p.add_argument("--ac", action="store_true", help="activation (gradient) checkpointing")
    p.add_argument("--answer-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="answers drawn to LO..HI tokens (rows then vary; --seq-len only caps them)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--preset", default="small")
    p.add_argument("--set", nargs="*", default=[], help="model shape overrides, e.g. num_layers=4")
    p.add_argument("--cfg", nargs="*", default=[], help="extra povid_dpo config overrides")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(_common.DEFAULT_WORKDIR))
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    spec = _common.spec_from_args(a.preset, _common.parse_overrides(a.set))
    ws = _common.prepare_workspace(
        spec, seq_len=a.seq_len, n_records=a.batch * (a.warmup + a.steps), seed=a.seed,
        workdir=Path(a.workdir), answer_tokens=a.answer_tokens and tuple(a.answer_tokens),
    )  # fmt: skip
    row_tokens = a.seq_len if a.answer_tokens is None else _common.mean_row_tokens(ws, ws.n_records)
    bucket_clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    timers = Timers(time.process_time if bucket_clock == "cpu" else time.perf_counter)
    clock = StepClock(timers, a.warmup, a.steps)
    run = (run_ours if a.side == "ours" else run_trl)(a, ws, timers, clock)
    setup_peak = _common.peak_rss_gb()
    static_gb = _common.rss_gb()
    _common.reset_peak_rss()
    run["trainer"]()
    train_peak = _common.peak_rss_gb()
    run["cleanup"]()

    stamps, snapshots = clock.stamps, clock.snapshots
    if len(stamps) < a.warmup + a.steps:
        raise RuntimeError(f"only {len(stamps)} steps ran")
    step_times = [t1 - t0 for t0, t1 in zip(stamps[a.warmup - 1 :], stamps[a.warmup :])]
    cpu = clock.cpu_stamps
    cpu_times = [t1 - t0 for t0, t1 in zip(cpu[a.warmup - 1 :], cpu[a.warmup :])]
    mean = sum(step_times) / len(step_times)
    median = sorted(step_times)[len(step_times) // 2]
    bucket_times = cpu_times if bucket_clock == "cpu" else step_times
    buckets = {}
    if len(snapshots) == 2:
        before, after = snapshots
        for key in set(after) | set(before):
            buckets[key] = (after.get(key, 0.0) - before.get(key, 0.0)) / a.steps
    # The reference bucket of TRL nests inside compute_loss: "policy_forward" is exclusive.
    buckets["other"] = max(sum(bucket_times) / len(bucket_times) - sum(buckets.values()), 0.0)
    result = dict(
        side=a.side, method=a.method, objective=a.objective, noise=a.noise, cfg=a.cfg,
        precompute=a.precompute, ac=a.ac, batch=a.batch, seq_len=a.seq_len, row_tokens=row_tokens,
        rows=run["rows"], preset=a.preset, params=run["params"], trainable=run["trainable"],
        step_s=mean, step_s_median=median, step_s_min=min(step_times), step_s_all=step_times,
        cpu_s=sum(cpu_times) / len(cpu_times), cpu_s_all=cpu_times, load_avg=os.getloadavg(), samples_per_s=a.batch / mean,
        tokens_per_s=run["rows"] * row_tokens / mean, train_peak_gb=train_peak,
        setup_peak_gb=setup_peak, static_gb=static_gb, runtime_gb=run["runtime_gb"],
        setup_s=run["setup_s"], precompute_s=run["precompute_s"].get("value"),
        n_records=ws.n_records, buckets=buckets, bucket_clock=bucket_clock,
        threads=torch.get_num_threads(),
    )  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)
    shutil.rmtree(run["output_dir"], ignore_errors=True)
    os._exit(0)  # skip slow interpreter teardown of big models


if __name__ == "__main__":
    main()
