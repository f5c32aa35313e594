"""Recipe ``povid_dpo``: POVID preference training of LLaVA-1.5 (LoRA, QLoRA, DoRA or full).

One device::

    tune run povid_dpo --config povid_7b_lora checkpoint_dir=llava-1.5-7b-hf data_file=prefs.jsonl

Several (FSDP2; the LLM is sharded, the frozen vision tower replicated)::

    tune run --nproc_per_node 8 povid_dpo --config povid_7b_full ...

Per step, for a batch of preference records (clean image; chosen, text-rejected and — from the
dataset or computed online — noise answers):

1. the vision tower runs once per image; its features serve every answer row of that image,
   in the policy pass and, while tower and projector are frozen, in the reference pass;
2. all rows (chosen, rejected, noise) go through the LLM in one concatenated forward; the
   output head runs only on the positions that predict an answer token (nothing else is scored);
   with ``packing: shared_prompt`` the rows of one image and prompt are one sequence, the prompt
   computed once for all of them (``povid.packing``);
3. the online noise answer, if configured, is the teacher-forced argmax on the noisy image
   (fresh noise every epoch), scored on the clean image's logits of the chosen row;
4. the reference is the same model with adapters disabled (LoRA; a frozen copy of a trainable
   projector) or a frozen copy (full); its log-probs can be precomputed once and cached (a full
   fine-tuning run then frees its frozen copy, unless online noise still needs it);
5. the objective (``povid``, ``povid_released``, ``dpo``; sigmoid/IPO/hinge) gives the loss.

Checkpoints (``${output_dir}/step_N``): adapters, merged llava-hf model, recipe state;
``resume_from_checkpoint=True`` continues from the newest one exactly.
"""

import hashlib
import json
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer
from tqdm import tqdm

from povid.checkpoint import LlavaCheckpointer, load_model_state
from povid.config import check_choice, parse
from povid.loss import POVIDLoss, PreferenceLogProbs, answer_logprobs
from povid.packing import SharedPromptPack, pack_shared_prompts, packed_answer_logits
from povid.reference import ReferenceModel
from povid.training import (
    StepCheckpoints,
    TrainingLog,
    all_reduce_replicated_grads,
    answer_positions,
    answer_targets,
    answer_token_counts,
    atomic_torch_save,
    built_projector_trainable,
    check_finite,
    clip_grad_norm,
    disable_dropout,
    encode_images,
    fingerprint,
    image_encoder,
    is_lora_model,
    mixed_precision,
    peak_memory_gb,
    plan_run,
    row_logits,
    set_trainable,
    setup_profiler,
    shard_llava,
    timed_batches,
    upcast_trainable,
)
from povid_data.distort import NoiseSettings
from povid_data.preference_dataset import PreferenceBatch, collate_preferences
from povid_data.transforms import LlavaImageTransform, LlavaMessageTransform

log = utils.get_logger("INFO")

# Every enumerated setting, checked at start: a typo must not silently pick another branch.
SETTING_CHOICES = {
    "noise.source": ("dataset", "online", "none"),
    "noise.condition": ("clean", "noisy"),
    "noise.overflow": ("clamp", "wrap"),
    "noise.argmax": ("shared", "separate"),
    "image_mode": ("pad", "crop"),
    "dtype": ("fp32", "bf16", "fp16"),
    "trainable_dtype": (None, "fp32", "bf16", "fp16"),
    "save_dtype": (None, "fp32", "bf16", "fp16"),
    "packing": ("none", "shared_prompt"),
}


class POVIDDPORecipe:
    """Setup, train loop, checkpoints and cleanup of POVID preference training."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.distributed = training.is_distributed()
        if self.distributed:
            backend = "gloo" if cfg.device == "cpu" else "nccl"
            dist.init_process_group(backend=backend)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.device = utils.get_device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.output_dir = Path(cfg.output_dir)
        for key, choices in SETTING_CHOICES.items():
            check_choice(cfg, key, choices)
        # The parameters that train (and their AdamW state) in fp32 whatever the compute dtype.
        self.trainable_dtype = training.get_dtype(cfg.get("trainable_dtype", "fp32"), device=self.device)
        # The rows of one image and prompt share one pass over the prompt (povid.packing).
        self.packing = cfg.get("packing", "none")
        self.global_step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0

    # ------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Build models, data, optimizer; precompute the reference; resume if asked."""
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
        self.projector_trainable = built_projector_trainable(self.model)
        self.trainable = set_trainable(self.model, projector_trainable=self.projector_trainable)
        self.projector_params = list(image_encoder(self.model).projector.parameters())
        if cfg.get("disable_dropout", True):
            # As TRL's DPOTrainer (POVID's released trainer): the log-probs and the online
            # argmax of the policy must not be random.
            disable_dropout(self.model)

        # Adapters off (LoRA, + a frozen projector copy if the projector trains) or a frozen
        # copy (full): povid.reference.ReferenceModel.
        self.reference = ReferenceModel(self.model, lora=self.lora, projector_trainable=self.projector_trainable)
        # After the reference copies, which stay frozen in the compute dtype.
        upcast_trainable(self.model, self.trainable, self.trainable_dtype)

        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(
                self.model, auto_wrap_policy={TransformerSelfAttentionLayer}
            )
        if self.distributed:
            shard_llava(self.model, compute_dtype=self.dtype)
            if self.reference.frozen_copy is not None:
                shard_llava(self.reference.frozen_copy, compute_dtype=self.dtype)
        if cfg.compile:
            training.compile_model(self.model, verbose=self.is_rank_zero)

        self.loss_fn: POVIDLoss = config.instantiate(cfg.loss)
        self.noise = NoiseSettings.from_config(cfg.noise, objective_uses_noise=self.loss_fn.uses_noise)
        if self.loss_fn.uses_noise and self.noise.source == "none":
            log.warning("noise.source=none: the noise term of the objective is dropped")
        self._setup_data()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, params)

        self.batches_per_epoch, self.steps_per_epoch, self.total_steps = plan_run(
            len(self.dataloader), cfg.gradient_accumulation_steps, cfg.epochs, cfg.get("max_steps_per_epoch"), cfg.max_steps
        )
        self.lr_scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps)
        self.profiler = setup_profiler(cfg.get("profiler"))

        if cfg.reference.precompute:
            self.reference.cache = self._precompute_reference()
            if not self.noise.online:
                # Every reference log-prob now comes from the cache (only online noise answers
                # would need a live reference): a full fine-tuning run's frozen copy would just
                # hold a second model's worth of memory.
                self.reference.release_copy()
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
                f"{'LoRA' if self.lora else 'full'} training, {n_train / 1e6:.2f} M trainable params "
                f"in {cfg.get('trainable_dtype', 'fp32')} (compute {cfg.dtype}), {len(self.dataset)} records, "
                f"{self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.2f} epochs of "
                f"{self.steps_per_epoch}{', set by max_steps' if cfg.max_steps is not None else ''}), "
                f"world size {self.world_size}; reference: {self.reference.form}"
            )

    def _setup_data(self) -> None:
        cfg = self.cfg
        args = self.checkpointer.args
        self.tokenizer = config.instantiate(cfg.tokenizer)
        messages = LlavaMessageTransform(
            self.tokenizer, args.image_token_id, args.num_image_tokens, max_seq_len=cfg.max_seq_len
        )
        images = LlavaImageTransform(cfg.image_mode, size=args.image_size)
        # Dataset answers are scored on the very image povid_distort showed the model; online
        # noise is fresh every epoch yet reproducible, so a resumed run sees the same.
        noise_fn = self.noise.image_noise(seed=cfg.seed)
        # The dataset block names the builder (a user's own takes the same keyword arguments).
        self.dataset = config.instantiate(
            cfg.dataset, message_transform=messages, image_transform=images,
            use_noise_answers=self.noise.dataset_answers, noise_fn=noise_fn,
        )  # fmt: skip
        # Same shuffled order for any world size: rank r takes positions r, r + world, ...
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=cfg.get("shuffle", True), seed=cfg.seed
        )
        self.dataloader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            # Noise rows scored on the noisy image get it stacked after the clean ones.
            collate_fn=partial(
                collate_preferences, pad_id=args.pad_token_id, noise_rows_on_noisy_image=self.noise.noisy_dataset_rows
            ),
            num_workers=cfg.get("num_workers", 0),
        )

    # ------------------------------------------------------------------------- forward

    def _pack(self, batch: PreferenceBatch) -> Optional[SharedPromptPack]:
        """The batch's rows packed behind their shared prompts (``packing: shared_prompt``)."""
        if self.packing != "shared_prompt":
            return None
        return pack_shared_prompts(batch.tokens, batch.labels, batch.row_image, self.checkpointer.args.pad_token_id)

    def _row_logps(
        self, model, features, batch, pack: Optional[SharedPromptPack], *, reference: bool, online_noise: bool,
        shared_noise_targets: Optional[torch.Tensor] = None,
    ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Summed log-probs per row kind (and the online noise answer's) for one model, and
        the online noise answer's tokens (None without online noise).

        The output head runs on answer positions only (``[n_answer_tokens, vocab]`` logits):
        nothing else is ever scored, and on short rows the head is a large share of the step.
        ``pack``: the batch packed by shared prompt (None: row by row); the logits come in the
        same order either way. ``shared_noise_targets``: the policy's noise answer, which the
        reference scores under ``noise.argmax=shared`` instead of taking its own argmax.
        """
        positions = answer_positions(batch.labels)
        if pack is None:
            logits = row_logits(model, batch.tokens, features, batch.row_image, positions)
        else:
            logits = packed_answer_logits(model, pack, features)
        logps = answer_logprobs(logits, positions[0], answer_targets(batch.labels, positions), len(batch.tokens))
        out = {kind: logps[rows] for kind, rows in batch.kind_rows.items()}
        noise_targets = None
        if online_noise:
            # Positions are row-major, so the chosen rows' entries keep the order that
            # answer_positions gives for labels[chosen_rows].
            of_chosen = torch.isin(positions[0], batch.chosen_rows)
            out["noise"], noise_targets = self._online_noise_logps(
                model, logits[of_chosen], batch, reference=reference, shared_targets=shared_noise_targets
            )
        return out, noise_targets

    def _online_noise_logps(self, model, chosen_logits, batch, *, reference: bool, shared_targets):
        """log p(y_noise | image, y_w,<t) with y_noise the argmax on the noisy image (this
        model's own, or ``shared_targets`` when given), and y_noise.

        ``chosen_logits``: the clean pass's logits at the chosen rows' answer positions.
        """
        condition = self.noise.condition
        tokens, labels = batch.tokens[batch.chosen_rows], batch.labels[batch.chosen_rows]
        positions = answer_positions(labels)
        own_argmax = shared_targets is None
        if own_argmax or condition == "noisy":
            # One noisy pass serves both the argmax and, if conditioned on it, the scoring.
            with nullcontext() if condition == "noisy" and not reference else torch.no_grad():
                noisy_features = self._features(model, batch.noisy_images, reference=reference)
                noisy_logits = row_logits(model, tokens, noisy_features, positions=positions)
        if own_argmax:
            # Teacher-forced: at each answer position the token ranked first given y_w,<t.
            noise_targets = noisy_logits.detach().argmax(-1)
        else:
            noise_targets = shared_targets
        scored = noisy_logits if condition == "noisy" else chosen_logits
        return answer_logprobs(scored, positions[0], noise_targets, len(batch.chosen_rows)), noise_targets

    def _features(self, model, images, *, reference: bool) -> torch.Tensor:
        return self.reference.features(images) if reference else encode_images(model, images)

    def _reference_logps(
        self, batch, policy_features, pack: Optional[SharedPromptPack], *, online_noise: bool, use_cache: bool = True,
        policy_noise_targets: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        # Online noise answers change every step, so a cache can only serve the file's rows.
        if use_cache and self.reference.cache is not None and not online_noise:
            return self._cached_reference(batch)
        shared = policy_noise_targets if self.noise.reference_shares_argmax else None
        if online_noise and self.noise.reference_shares_argmax and shared is None:
            raise ValueError("noise.argmax=shared: the reference needs the policy's noise answer")
        reference = self.reference.model
        with torch.no_grad(), self.reference.scoring():
            if self.reference.shares_policy_features:
                features = policy_features.detach()
            else:
                features = self._features(reference, batch.images, reference=True)
            logps, _ = self._row_logps(
                reference, features, batch, pack, reference=True, online_noise=online_noise, shared_noise_targets=shared
            )
        return logps

    def _cached_reference(self, batch: PreferenceBatch) -> Dict[str, torch.Tensor]:
        cache = self.reference.cache
        return {
            kind: torch.tensor([cache[batch.ids[owner]][kind] for owner in batch.row_example[rows].tolist()], device=self.device)
            for kind, rows in batch.kind_rows.items()
        }

    def _mixed_precision(self):
        return mixed_precision(self.device, self.dtype, self.trainable_dtype, distributed=self.distributed)

    def preference_logprobs(self, batch: PreferenceBatch) -> PreferenceLogProbs:
        """Policy and reference log-probs of every answer of a batch (on the recipe's device),
        per example, as the loss takes them: one step's forward without the loss."""
        features = self._features(self.model, batch.images, reference=False)
        pack = self._pack(batch)
        policy, noise_targets = self._row_logps(
            self.model, features, batch, pack, reference=False, online_noise=self.noise.online
        )
        ref = self._reference_logps(
            batch, features, pack, online_noise=self.noise.online, policy_noise_targets=noise_targets
        )
        noise, ref_noise, mask = self._noise_per_example(policy, ref, batch)
        return PreferenceLogProbs(
            chosen=policy["chosen"],
            rejected=policy["rejected"],
            ref_chosen=ref["chosen"],
            ref_rejected=ref["rejected"],
            noise=noise,
            ref_noise=ref_noise,
            noise_mask=mask,
            chosen_tokens=answer_token_counts(batch.labels[batch.chosen_rows]),
        )

    def _noise_per_example(self, policy, ref, batch: PreferenceBatch):
        n = batch.num_examples
        if "noise" not in policy:
            return None, None, None
        if self.noise.online:
            return policy["noise"], ref["noise"], torch.ones(n, dtype=torch.bool, device=self.device)
        owners = batch.row_example[batch.noise_rows]
        noise = torch.zeros(n, device=self.device, dtype=policy["noise"].dtype)
        ref_noise = torch.zeros_like(noise)
        mask = torch.zeros(n, dtype=torch.bool, device=self.device)
        noise = noise.index_put((owners,), policy["noise"])
        ref_noise = ref_noise.index_put((owners,), ref["noise"].to(noise.dtype))
        mask[owners] = True
        return noise, ref_noise, mask

    # ------------------------------------------------------------------------- reference cache

    def _reference_cache_key(self) -> Dict[str, Any]:
        """Everything a reference log-prob depends on: the data, the base weights, the model as
        configured, and each setting of the transforms and the noise. (Not the learning rate,
        objective or schedule: they change the policy, not the reference.)"""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        checkpoint = Path(cfg["checkpoint_dir"])
        return {
            "data": fingerprint(cfg["data_file"]),
            "image_dir": str(Path(self.dataset.image_dir).resolve()),
            "checkpoint": [
                (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(checkpoint.iterdir()) if p.is_file()
            ],
            "clip_dir": cfg.get("clip_dir") and str(Path(cfg["clip_dir"]).resolve()),
            "model": cfg["model"],
            "noise": cfg["noise"],
            **{k: cfg.get(k) for k in ("max_seq_len", "image_mode", "dtype", "trainable_dtype", "device")},
        }

    def _reference_cache_path(self, key: Dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return self.output_dir / "reference_logps" / f"{digest[:16]}.pt"

    def _precompute_reference(self) -> Dict[str, Dict[str, float]]:
        """Reference log-probs of every dataset row, computed once and cached on disk."""
        key = self._reference_cache_key()
        path = self._reference_cache_path(key)
        if path.exists():
            stored = torch.load(path)
            # The key is checked, not only the file name: a cache written by another version,
            # or a digest collision, is recomputed, never reused.
            if isinstance(stored, dict) and json.dumps(stored.get("key"), sort_keys=True, default=str) == json.dumps(
                key, sort_keys=True, default=str
            ):
                log.info(f"Reference log-probs from cache {path}")
                return stored["logps"]
            log.info(f"Reference cache {path} was written for other settings: recomputing")
        cache: Dict[str, Dict[str, float]] = {}
        loader = DataLoader(
            torch.utils.data.Subset(self.dataset, range(self.rank, len(self.dataset), self.world_size)),
            batch_size=self.cfg.batch_size,
            collate_fn=self.dataloader.collate_fn,
        )
        for batch in tqdm(loader, desc="reference log-probs", disable=not self.is_rank_zero):
            batch = batch.to(self.device, self.dtype)
            with torch.no_grad(), self._mixed_precision():
                features = self._features(self.model, batch.images, reference=False)
                ref = self._reference_logps(batch, features, self._pack(batch), online_noise=False, use_cache=False)
            for kind, rows in batch.kind_rows.items():
                for owner, logp in zip(batch.row_example[rows].tolist(), ref[kind].tolist()):
                    cache.setdefault(batch.ids[owner], {})[kind] = logp
        if self.distributed:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, cache)
            cache = {k: v for part in gathered for k, v in part.items()}
        if self.is_rank_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"key": key, "logps": cache}, path)
            log.info(f"Cached reference log-probs of {len(cache)} records in {path}")
        return cache

    # ------------------------------------------------------------------------- train

    def train(self) -> None:
        """The training loop: accumulate, clip, step, log, checkpoint, guard against NaN."""
        cfg = self.cfg
        accumulation = cfg.gradient_accumulation_steps
        bar = tqdm(
            total=self.total_steps, initial=self.global_step, desc="povid_dpo", disable=not self.is_rank_zero
        )
        self.model.train()
        self.profiler.start()
        while self.global_step < self.total_steps:  # max_steps may cycle the epochs
            self.sampler.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch)
            step_start, tokens_seen, sums = time.perf_counter(), 0, {}
            data_seconds = 0.0
            for index, (waited, batch) in enumerate(timed_batches(self.dataloader)):
                if index < self.batches_done_in_epoch:
                    continue  # resumed: these batches were consumed before the stop
                data_seconds += waited
                batch = batch.to(self.device, self.dtype)
                with self._mixed_precision():
                    loss, metrics = self.loss_fn(self.preference_logprobs(batch))
                    loss = loss / accumulation
                self._check_finite(loss, "loss")
                loss.backward()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) / accumulation
                tokens_seen += int((batch.labels != -100).sum())
                self.batches_done_in_epoch = index + 1
                last_in_epoch = index + 1 == self.batches_per_epoch
                if self.batches_done_in_epoch % accumulation and not last_in_epoch:
                    continue
                all_reduce_replicated_grads(p for p in self.projector_params if p.requires_grad)
                grad_norm = clip_grad_norm(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad_norm
                )
                self._check_finite(grad_norm, "gradient norm")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                self.global_step += 1
                elapsed = time.perf_counter() - step_start
                sums.update(
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm),
                    tokens_per_second=tokens_seen * self.world_size / max(elapsed, 1e-9),
                    step_seconds=elapsed,
                    data_seconds=data_seconds,
                )
                if cfg.get("log_peak_memory_stats", True):
                    sums["peak_memory_gb"] = peak_memory_gb(self.device)
                self.training_log.log(self.global_step, sums)
                bar.update(1)
                self.profiler.step()
                bar.set_postfix(loss=f"{sums['loss']:.4f}", acc=f"{sums['rewards/accuracy']:.2f}")
                step_start, tokens_seen, sums = time.perf_counter(), 0, {}
                data_seconds = 0.0
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
    """Entry point for ``tune run povid_dpo --config <config>``."""
    recipe = POVIDDPORecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
