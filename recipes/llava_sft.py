"""Recipe ``llava_sft``: supervised fine-tuning of LLaVA-1.5 on instruction data (LoRA or full).

One device::

    tune run llava_sft --config llava_sft_tiny_full checkpoint_dir=DIR data_file=sft.json \\
        image_dir=images/ output_dir=out/sft

Several (FSDP2; the LLM is sharded, the vision encoder replicated)::

    tune run --nproc_per_node 8 llava_sft --config llava_sft_tiny_full ...

Per step, for a batch of LLaVA records (any number of turns, with or without an image):

1. the conversation is tokenized with the vicuna_v1 template, as the original LLaVA does it;
   labels are -100 everywhere but the assistant answers and their ``</s>``;
2. the model runs on tokens + images (one image per ``<image>``); the loss is the mean
   next-token cross-entropy over the answer tokens (labels shifted here), or with
   ``loss_per_answer=true`` the mean over answers of each answer's mean, so that short answers
   weigh as much as long descriptions;
3. what trains is a config choice: LoRA adapters (+ projector), or the full LLM + projector;
   ``vision_trainable=true`` also trains the CLIP tower, at ``vision_lr_scale`` times the
   learning rate (for a tower that is not pretrained, such as the synthetic world's; LLaVA-1.5
   keeps it frozen).

Checkpoints (``${output_dir}/step_N``): adapters (LoRA), merged llava-hf model, recipe state;
``${output_dir}/final`` links the last. ``resume_from_checkpoint=True`` continues from the newest
complete one, with the same batches, learning rate and optimizer state.
"""

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer
from tqdm import tqdm

from povid.checkpoint import LlavaCheckpointer, load_model_state
from povid.config import parse
from povid.training import (
    StepCheckpoints,
    TrainingLog,
    all_reduce_replicated_grads,
    answer_cross_entropy,
    answer_positions,
    built_projector_trainable,
    check_finite,
    clip_grad_norm,
    image_encoder,
    is_lora_model,
    mixed_precision,
    output_at,
    peak_memory_gb,
    plan_run,
    set_trainable,
    set_vision_trainable,
    setup_profiler,
    shard_llava,
    upcast_trainable,
    vision_param_groups,
)
from povid_data.instruction_dataset import InstructionDataset, collate_instructions
from povid_data.transforms import IGNORE_INDEX, LlavaImageTransform, LlavaMessageTransform

log = utils.get_logger("INFO")


class LlavaSFTRecipe:
    """Setup, train loop, checkpoints and cleanup of LLaVA supervised fine-tuning."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.distributed = training.is_distributed()
        if self.distributed:
            dist.init_process_group(backend="gloo" if cfg.device == "cpu" else "nccl")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.device = utils.get_device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        # The parameters that train (and their AdamW state) in fp32 whatever the compute dtype.
        self.trainable_dtype = training.get_dtype(cfg.get("trainable_dtype", "fp32"), device=self.device)
        self.output_dir = Path(cfg.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0

    # ------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Build the model, data, optimizer and schedule; resume if asked."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.checkpointer: LlavaCheckpointer = config.instantiate(cfg.checkpointer)
        base_state = self.checkpointer.load_checkpoint()["model"]
        with training.set_default_dtype(self.dtype), self.device:
            self.model = config.instantiate(cfg.model)
        load_model_state(self.model, base_state, cfg.checkpoint_dir)
        self.lora = is_lora_model(self.model)
        for module in self.model.modules():
            if hasattr(module, "initialize_dora_magnitude"):  # DoRA starts from ||W||
                module.initialize_dora_magnitude()
        self.trainable = set_trainable(self.model, projector_trainable=built_projector_trainable(self.model))
        if cfg.get("vision_trainable", False):
            self.trainable = set_vision_trainable(self.model, self.trainable)
        upcast_trainable(self.model, self.trainable, self.trainable_dtype)
        # Parameters FSDP does not manage (the replicated vision encoder) are averaged by hand.
        self.replicated_params = [p for p in image_encoder(self.model).parameters() if p.requires_grad]

        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(self.model, auto_wrap_policy={TransformerSelfAttentionLayer})
        if self.distributed:
            shard_llava(self.model, compute_dtype=self.dtype)
        if cfg.compile:
            training.compile_model(self.model, verbose=self.is_rank_zero)

        self._setup_data()
        groups = vision_param_groups(self.model, cfg.optimizer.lr, cfg.get("vision_lr_scale", 1.0))
        self.optimizer = config.instantiate(cfg.optimizer, groups)
        self.batches_per_epoch, self.steps_per_epoch, self.total_steps = plan_run(
            len(self.dataloader), cfg.gradient_accumulation_steps, cfg.epochs, cfg.get("max_steps_per_epoch"), cfg.max_steps
        )
        self.lr_scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps)
        self.profiler = setup_profiler(cfg.get("profiler"))
        self.checkpoints = StepCheckpoints.from_config(
            cfg, checkpointer=self.checkpointer, trainable=self.trainable, lora=self.lora, device=self.device
        )
        if cfg.resume_from_checkpoint:
            position = self.checkpoints.resume(self.model, self.optimizer, self.lr_scheduler, device=self.device)
            if position is not None:
                self.global_step, self.epoch, self.batches_done_in_epoch = position
        self.training_log = TrainingLog.from_config(cfg, resume_step=self.global_step)
        if self.is_rank_zero:
            n_train = sum(p.numel() for n, p in self.model.named_parameters() if n in self.trainable)
            log.info(
                f"{'LoRA' if self.lora else 'full'} SFT, {n_train / 1e6:.2f} M trainable params, "
                f"{len(self.dataset)} records, {self.total_steps} steps of {cfg.batch_size} x "
                f"{cfg.gradient_accumulation_steps} x {self.world_size}"
            )

    def _setup_data(self) -> None:
        cfg = self.cfg
        args = self.checkpointer.args
        tokenizer = config.instantiate(cfg.tokenizer)
        messages = LlavaMessageTransform(tokenizer, args.image_token_id, args.num_image_tokens, max_seq_len=cfg.max_seq_len)
        images = LlavaImageTransform(cfg.image_mode, size=args.image_size)
        self.dataset = InstructionDataset(cfg.data_file, messages, images, image_dir=cfg.image_dir)
        # Same shuffled order for any world size: rank r takes positions r, r + world, ...
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=cfg.get("shuffle", True), seed=cfg.seed
        )
        self.dataloader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=partial(collate_instructions, pad_id=args.pad_token_id),
            num_workers=cfg.get("num_workers", 0),
        )

    # ------------------------------------------------------------------------------- train

    def _loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        encoder_input = None
        if batch["images"] is not None:
            encoder_input = {"image": {"images": batch["images"].to(self.device, self.dtype)}}
        # The output head runs on answer positions only: nothing else is scored, and with a
        # 32064-row vocabulary it is a large share of a step on short rows.
        with mixed_precision(self.device, self.dtype, self.trainable_dtype, distributed=self.distributed), \
                output_at(self.model, answer_positions(labels)):
            logits = self.model(tokens, encoder_input=encoder_input)
        return answer_cross_entropy(logits, labels, per_answer=self.cfg.get("loss_per_answer", False))

    def train(self) -> None:
        """The training loop: accumulate, clip, step, log, checkpoint, guard against NaN."""
        cfg = self.cfg
        accumulation = cfg.gradient_accumulation_steps
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="llava_sft", disable=not self.is_rank_zero)
        self.model.train()
        self.profiler.start()
        while self.global_step < self.total_steps:  # max_steps may cycle the epochs
            self.sampler.set_epoch(self.epoch)
            step_start, tokens_seen, loss_sum = time.perf_counter(), 0, 0.0
            for index, batch in enumerate(self.dataloader):
                if index < self.batches_done_in_epoch:
                    continue  # resumed: these batches were consumed before the stop
                loss = self._loss(batch) / accumulation
                self._check_finite(loss, "loss")
                loss.backward()
                loss_sum += float(loss.detach())
                tokens_seen += int((batch["labels"] != IGNORE_INDEX).sum())
                self.batches_done_in_epoch = index + 1
                last_in_epoch = index + 1 == self.batches_per_epoch
                if self.batches_done_in_epoch % accumulation and not last_in_epoch:
                    continue
                all_reduce_replicated_grads(self.replicated_params)
                grad_norm = clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad_norm)
                self._check_finite(grad_norm, "gradient norm")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                self.global_step += 1
                elapsed = time.perf_counter() - step_start
                metrics = {
                    "loss": loss_sum,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "tokens_per_second": tokens_seen * self.world_size / max(elapsed, 1e-9),
                }
                if cfg.get("log_peak_memory_stats", True):
                    metrics["peak_memory_gb"] = peak_memory_gb(self.device)
                self.training_log.log(self.global_step, metrics)
                bar.update(1)
                self.profiler.step()
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                step_start, tokens_seen, loss_sum = time.perf_counter(), 0, 0.0
                if last_in_epoch:
                    self.epoch += 1
                    self.batches_done_in_epoch = 0
                if self.global_step >= self.total_steps:
                    break
                if cfg.save_every_n_steps and self.global_step % cfg.save_every_n_steps == 0:
                    self.save_checkpoint()
                if last_in_epoch:
                    self.save_checkpoint()
                    break
        bar.close()
        self.profiler.stop()
        self.save_checkpoint(final=True)

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        check_finite(value, what, step=self.global_step + 1, epoch=self.epoch, last_checkpoint=self.checkpoints.last)

    def save_checkpoint(self, final: bool = False) -> None:
        """Write ``step_N/``: adapters (LoRA), merged llava-hf model, and the recipe state."""
        self.checkpoints.save(
            self.model, self.optimizer, self.lr_scheduler, global_step=self.global_step, epoch=self.epoch,
            batches_done_in_epoch=self.batches_done_in_epoch, final=final,
        )  # fmt: skip

    def cleanup(self) -> None:
        """Close loggers and the process group."""
        self.training_log.close()
        if self.distributed:
            dist.destroy_process_group()


@parse
def main(cfg: DictConfig) -> None:
    """Entry point for ``tune run llava_sft --config <config>``."""
    recipe = LlavaSFTRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
