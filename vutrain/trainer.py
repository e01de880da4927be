"""The Trainer: builds the engine, runs the loop, evaluates, checkpoints and resumes.

One `Trainer` per process. `train()` loops `train_step()` to `train.max_steps`; the trainer's own
state (step, data stream position, RNG) rides along with each DeepSpeed checkpoint, so a resumed
run produces the same per-step losses as an uninterrupted one.

A step is `next_batch` -> `forward_loss` -> `guard.agree` -> `backward_step` per micro-batch, with
no host synchronisation: non-finite losses are decided on the device (nonfinite.py) and the host
reads losses only on logging steps. The stop conditions (pre-emption, too many non-finite losses
in a row) are checked after every step from a copy the device wrote a step earlier (`StopCheck`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

from vutrain import checkpoint as ckpt
from vutrain import run_lock
from vutrain.config import ConfigError, RunConfig, save_config
from vutrain.data_wait import DataWaitWatch
from vutrain.distributed import DistInfo, all_reduce, barrier
from vutrain.engine import build_engine
from vutrain.evaluate import EvalInterrupted, Evaluator
from vutrain.global_batch import as_given, with_global_batch
from vutrain.grad_clip import count_zeroed_steps, mask_at_step
from vutrain.grad_norm import IntervalNormMax, logged_step_norm
from vutrain.losses import build_loss_from_config
from vutrain.metrics import IntervalTermMeans, MetricsWriter, logged_eval
from vutrain.model import (
    build_model,
    count_parameters,
    pretrained_clip_config,
    text_attention_mask,
    tokenizer_and_processor,
)
from vutrain.nonfinite import GuardStats, NonFiniteGuard
from vutrain.startup_errors import one_line

log = logging.getLogger("vutrain")
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", which the SLURM scripts turn into a requeue
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp_bf16": torch.float32, "fp16": torch.float16}
"""The dtype of the weights and of the inputs the engine is handed (amp_bf16: autocast does the rest)."""


def loss_features_dtype(uses_kernels: bool, device_type: str, precision: str) -> torch.dtype | None:
    """The dtype the loss gets the features in; None: as the model returns them.

    The torch loss takes fp32 (a bf16 logits matrix loses the label term), and so do the kernels
    off CUDA (the Triton interpreter computes bf16 wrongly). The kernels on CUDA take 16-bit
    features and accumulate in fp32 themselves: under amp_bf16 the normalised features leave
    autocast in fp32, so they go in as bf16, as in a bf16 run, not as fp32 tiles.

    uses_kernels: the loss's own answer for this call (`loss_fn.uses_kernels`), so that
    loss.backend=auto gets fp32 whenever it falls back to torch (labels, a bias, no Triton).
    """
    if not uses_kernels or device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if precision == "amp_bf16" else None


def features_for_loss(loss_fn, img, txt, logit_bias, labels, device_type: str, precision: str) -> tuple:
    """(img, txt) in the dtype the loss gets them in (see :func:`loss_features_dtype`).

    The loss is asked with the features in the dtype the kernels would take (bf16 under amp_bf16
    on CUDA): asked with amp_bf16's fp32 features, loss.backend=auto on a GPU whose Triton has no
    bf16 (before Ampere) chose the kernels, whose op then fell back to torch with bf16 logits.
    """
    kernel_dtype = loss_features_dtype(True, device_type, precision)
    if kernel_dtype == torch.float32:  # fp32 for the kernels and for torch alike: nothing to ask
        return _cast(img, torch.float32), _cast(txt, torch.float32)
    present = img if img is not None else txt  # GradCache may run one tower: the other is None
    as_kernel_input = present if kernel_dtype is None else present.to(kernel_dtype)
    if loss_fn.uses_kernels(as_kernel_input, logit_bias, labels):
        if kernel_dtype is None:
            return img, txt
        # The tower asked about is cast already: casting it again was a second copy of its features.
        return (as_kernel_input, _cast(txt, kernel_dtype)) if present is img else (None, as_kernel_input)
    return _cast(img, torch.float32), _cast(txt, torch.float32)


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def check_processor_fits_model(processor, name_or_path: str) -> None:
    """ConfigError unless the pretrained model's image processor makes the images its vision tower
    takes (HF's CLIP accepts only image_size x image_size pixels, so a non-square crop never fits).

    The mismatch surfaced at the first forward, after the engine and the loader were built, as
    transformers' "Input image size (224*192) doesn't match model (224*224)", naming no file to fix.
    """
    from vutrain.data.preprocess import crop_size

    side = int(pretrained_clip_config(name_or_path).vision_config.image_size)
    height, width = crop_size(processor)
    if (height, width) != (side, side):
        raise ConfigError(
            f"model.name_or_path={name_or_path}: its image processor makes {height}x{width} images but "
            f"the vision tower takes {side}x{side} (config.json's vision_config.image_size); set "
            f'"crop_size": {{"height": {side}, "width": {side}}} in its preprocessor_config.json'
        )


def engine_grad_norm(engine):
    """DeepSpeed's norm of the last optimizer step as it keeps it (a device tensor, a float or None)."""
    return getattr(engine, "get_global_grad_norm", lambda: None)()


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_steps non-finite losses in a row: training stops, checkpoints are kept."""


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; train.py exits with PREEMPT_EXIT_CODE."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"preempted at step {step} by {signame}")
        self.step, self.signame = step, signame


@dataclass
class StepTimes:
    """Host wall time of each phase of one step, summed over its micro-batches (seconds).

    Without `sync_timing` the GPU runs ahead of the host, so these are launch times there.
    """

    data: float = 0.0
    forward: float = 0.0
    loss: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0


IN_ROW, STOP_AGREED = 3, 4  # indices into NonFiniteGuard._stats


class StopCheck:
    """The stop conditions checked after every step without waiting for the device.

    Two conditions end a run early, and both are decided on the device, agreed by every rank
    (nonfinite.py's all-reduce): a stop request (a rank got SIGUSR1/SIGTERM) and a run of
    train.max_nonfinite_steps non-finite losses. They used to be read only on logging steps,
    so a large train.log_every delayed a pre-emption checkpoint past SLURM's warning window (or
    forever, with log_every > max_steps), and a run of non-finite losses could reach the limit
    and be reset by a good micro-batch between two reads. Now the longest run of non-finite
    losses seen is kept on the device (`note_agreed`, after every agreement), and each step
    copies it and the stop flag to the host asynchronously; the next step reads that copy. By
    then the device has normally written it: the read waits only when the device is more than a
    step behind the host, and never for the current step's work, so the GPU's queue stays full.
    All ranks read at the same steps the same agreed values, so they all stop at the same step
    (one step after the device saw the condition). `check(now=True)` waits for the current
    values instead, for steps that read the device anyway (logging, checkpoints, the end).
    """

    def __init__(self, guard: NonFiniteGuard, device: torch.device):
        self.guard = guard
        self.cuda = device.type == "cuda"
        self.worst_in_row = torch.zeros((), dtype=torch.float64, device=device)
        self._host = torch.zeros(2, dtype=torch.float64, pin_memory=self.cuda)
        self._event = None
        self._sent = False

    def note_agreed(self) -> None:
        """After each `guard.agree`: keep the longest run of skipped micro-batches (on the device)."""
        torch.maximum(self.worst_in_row, self._guard_stats[IN_ROW], out=self.worst_in_row)

    @property
    def _guard_stats(self) -> torch.Tensor:
        # The guard's device statistics (nonfinite.py): [3] skipped in a row, [4] stop agreed.
        return self.guard._stats

    def _values(self) -> torch.Tensor:
        return torch.stack([self.worst_in_row, self._guard_stats[STOP_AGREED]])

    def check(self, now: bool = False) -> tuple[int, bool]:
        """(longest run of non-finite losses so far, stop agreed): now, or as of the previous step."""
        if now:
            worst, stop = self._values().tolist()
        elif self._sent:
            if self._event is not None:
                self._event.synchronize()
            worst, stop = self._host.tolist()
        else:
            worst, stop = 0.0, 0.0  # the first step: nothing sent yet
        self._host.copy_(self._values(), non_blocking=self.cuda)
        if self.cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._sent = True
        return int(worst), stop > 0


def _error_kind(exc: Exception) -> str:
    """How a rank rebuilds rank 0's run-directory error from its broadcast text."""
    if isinstance(exc, run_lock.RunDirInUseError):
        return "in_use"
    return "config" if isinstance(exc, ConfigError) else "other"


class Trainer:
    """One rank's training run: engine, loss, data stream, eval and checkpoints (see the module doc).

    `__init__` builds one part per named builder, in dependency order; `train()` runs the loop.
    """

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    dtype: torch.dtype
    engine: object
    """The DeepSpeed engine around the ClipTrainModule."""
    loss_fn: torch.nn.Module
    stream: object
    """The TrainStream of this rank (resumable position)."""
    data_wait: DataWaitWatch
    """Warns when this rank waits data.stall_warning_s for its next batch."""
    guard: NonFiniteGuard
    evaluator: Evaluator
    metrics: MetricsWriter

    def __init__(self, cfg: RunConfig, info: DistInfo, sync_timing: bool = False):
        # train.py derives it too, but a Trainer built directly (a notebook, a benchmark, a tuner)
        # trained micro x world per step while config.yaml said global_batch_size (a resume through
        # train.py then derived another accumulation). Deriving twice gives the same config.
        cfg = with_global_batch(cfg, info.world_size)
        self.cfg, self.info = cfg, info
        self.run_dir = cfg.output_dir
        self.sync_timing = sync_timing  # bench: synchronise the GPU around each phase
        self.device = torch.device(info.device)
        self.dtype = DTYPES[cfg.train.precision]
        self.step = 0
        self._signal: str | None = None
        self._eval_pending = False  # a pre-emption checkpoint came before its step's eval (_preempt)
        self._finished = False  # the final checkpoint: its step's eval and done.json came before it
        self._checkpoint_step: int | None = None  # the step of the newest checkpoint loaded or saved
        self._run_lock: run_lock.RunLock | None = None
        try:
            self._agree_on_val_shards()
            self._prepare_run_dir()
            self._build_parts()
        except BaseException:
            # A failed start in a process that goes on (a test, a notebook) kept output_dir locked.
            self.release_run_dir()
            raise

    def _build_parts(self) -> None:
        """Every part after the run directory, in dependency order; resumes at the end."""
        cfg, info = self.cfg, self.info
        self._build_text_and_image_processing()
        trainable, total = self._build_engine()
        self._build_loss()
        self._build_data()
        self.guard = NonFiniteGuard(self.engine.module, self.device, info.world_size)
        if mask_at_step(self.engine, self.guard.skip):
            # One micro-batch per step: the step zeroes a skipped step's flat gradients once
            # (grad_clip.py), so the guard's masked_fill on every parameter in backward can go.
            self.guard.remove()
        # A step zeroed for a NaN/inf gradient under finite losses: counted on the device, logged.
        count_zeroed_steps(self.engine, self.guard.zeroed_steps)
        self.stop_check = StopCheck(self.guard, self.device)
        self.evaluator = Evaluator(
            cfg,
            info.rank,
            info.world_size,
            self.preprocess,
            self.tokenize,
            self.processor,
            self.dtype,
            self.device,
            # Resolves data.num_workers=-1 as training does, without the evaluator's host-name gather.
            local_world_size=info.local_world_size,
        )
        self.metrics = MetricsWriter(self.run_dir, enabled=info.is_main)
        self.last_stats = GuardStats(float("nan"), 0, 0, 0, False)
        self._last_scale: torch.Tensor | None = None
        self._step_lr = cfg.train.lr  # the LR of the last step run (train_step)
        # Wall time and steps since the last logged row: train/step_time is their mean. The logging
        # step alone, which waits for the GPU, also held the unfinished work of the step before.
        self._interval_wall, self._interval_steps = 0.0, 0
        self._terms = IntervalTermMeans()  # the loss's extra terms over the logging interval
        self._norm_max = IntervalNormMax()  # train/grad_norm_max
        log.info(
            "world_size=%d launcher=%s device=%s backend=%s",
            info.world_size,
            info.launcher,
            info.device,
            info.backend,
        )
        log.info(
            "parameters: %d trainable of %d; zero stage %d, %s; %d micro-batch(es) of %d per step; "
            "%d steps/epoch",
            trainable,
            total,
            cfg.train.zero_stage,
            cfg.train.precision,
            cfg.train.grad_accum_steps,
            cfg.train.micro_batch_size,
            self.stream.steps_per_epoch,
        )
        self._maybe_resume()

    # ------------------------------------------------------------------ builders

    def _agree_on_val_shards(self) -> None:
        """Every rank sees the same validation shards (names, byte sizes), or every rank raises the
        same one-line ValShardsError now, before the run directory is touched.

        Each rank only expanded the spec here, so node-local copies that differ (a truncated shard,
        a shard missing on one node but accepted by data.allow_missing_shards) were found at the
        first eval, eval.every steps (hours) into the run, or at the final eval of a run without
        periodic evals. With data.val_shards set the final eval always runs, so it is checked."""
        if self.cfg.data.val_shards:
            from vutrain.evaluate import agree_on_val_shards

            agree_on_val_shards(self.cfg.data.val_shards, self.device)

    def _prepare_run_dir(self) -> None:
        """Rank 0 locks output_dir, writes the resolved config and clears last run's end markers; all
        ranks wait.

        The lock (run_lock.py) comes before anything in the directory is read, written or moved
        aside: a second run started into it is refused on every rank, leaving the first run's files
        as they are. train.resume=never moves the previous run's checkpoints, metrics and preset
        tokenizer aside (the lock file stays): the tokenizer is trained again for this run (it was
        reused without a word, so a fresh start with another model.vocab_size, caption template or
        data kept the old one). A run resumed from another run's checkpoint takes that run's preset
        tokenizer.
        """
        failure = None
        try:
            if self.info.is_main:
                self._run_lock = run_lock.acquire(self.run_dir)
            adoption = None
            if not self.cfg.model.name_or_path:  # a preset: its token ids are its tokenizer's
                # Every rank: a refusal raised on rank 0 alone left the others waiting at the barrier.
                adoption = ckpt.tokenizer_to_adopt(self.cfg.train.resume, self.run_dir)
            if self.info.is_main:
                self._write_run_dir(adoption)
                ckpt.write_shared_token(self.run_dir)  # here, so a failed write is shared below
        except Exception as exc:  # told to every rank below, then raised on each
            failure = exc
        self._share_run_dir_outcome(failure)
        self._check_every_rank_sees_run_dir()

    def _check_every_rank_sees_run_dir(self) -> None:
        """Every rank reads the token rank 0 wrote into output_dir, or every rank stops with one
        ConfigError line naming the ranks (and hosts) that do not, before anything is built.

        An output_dir that is not one shared folder (node-local disk, a mount missing on a node)
        was found only at the first checkpoint, possibly hours in (checkpoint.py checks each save's
        folder). With a preset those ranks loaded the tokenizer left on their own disk by an earlier
        run (other token ids, without a word), or failed with transformers' "Repo id" error while
        rank 0 waited in a collective. The token is removed whatever the outcome: no file of the run."""
        try:
            ckpt.check_every_rank_sees(self.run_dir, "the run did not start", ConfigError, "prepared")
        finally:
            if self.info.is_main:
                ckpt.remove_shared_token(self.run_dir)

    def release_run_dir(self) -> None:
        """Let another run use output_dir (train() calls it whichever way it ends; a Trainer that
        never trains, a benchmark's, calls it when done). Safe to call more than once."""
        lock, self._run_lock = self._run_lock, None
        if lock is not None:
            lock.release()

    def _write_run_dir(self, adoption: tuple | None) -> None:
        """Rank 0's part of `_prepare_run_dir`."""
        # Before the move aside too: a kill after a save's marker left it as .tmp (checkpoint.py).
        ckpt.finish_interrupted_publish(ckpt.checkpoints_dir(self.run_dir))
        if self.cfg.train.resume == "never":
            ckpt.move_aside(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        if adoption is not None:
            ckpt.copy_adopted_tokenizer(self.cfg.train.resume, *adoption)
        save_config(as_given(self.cfg), os.path.join(self.run_dir, "config.yaml"))
        for stale in ("preempted.json", "done.json"):
            if os.path.exists(os.path.join(self.run_dir, stale)):
                os.remove(os.path.join(self.run_dir, stale))

    def _share_run_dir_outcome(self, failure: Exception | None) -> None:
        """Every rank waits for rank 0's run directory, and stops with rank 0's error if it failed.

        A plain barrier left the other ranks waiting in it when rank 0 failed (an output_dir that
        is a file, or not writable): a peer's traceback, or a hang until the group's timeout."""
        if isinstance(failure, OSError):
            failure = ConfigError(
                f"output_dir={self.run_dir} could not be prepared ({one_line(failure)}): "
                "choose an output_dir this user can write to (not a file), or fix its permissions"
            )
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            mine = failure if self.info.is_main else None
            box = [None if mine is None else (_error_kind(mine), str(mine))]
            # The broadcast is the barrier: a rank passes it once rank 0 is done or has failed.
            torch.distributed.broadcast_object_list(box, src=0, device=self.device)
            # Rank 0's error wins over a rank's own, so all say the same: its refused lock, not a
            # peer's read of the files of the run that holds it.
            if box[0] is not None and not self.info.is_main:
                kind, message = box[0]
                # The same words and type on every rank: rank 0 alone prints them (train.py), but
                # every node's first rank prints a held output_dir, not as a "config error".
                if kind == "in_use":
                    raise run_lock.RunDirInUseError(message)
                if kind == "config":
                    raise ConfigError(message)
                raise RuntimeError(f"rank 0 could not prepare the run directory: {message}")
        if failure is not None:
            raise failure

    def _build_text_and_image_processing(self) -> None:
        """Tokenizer (trained on rank 0 for presets), image processor and their batch functions."""
        from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
        from vutrain.data.tokenizer import make_tokenize

        d = self.cfg.data
        self.tokenizer, self.processor, self.context_length = tokenizer_and_processor(
            self.cfg.model,
            self.run_dir,
            d.train_shards,
            d.caption_template,
            d.tokenizer_samples,
            self.info.is_main,
            barrier,
        )
        if self.cfg.model.name_or_path:
            check_processor_fits_model(self.processor, self.cfg.model.name_or_path)
        self.tokenize = make_tokenize(self.tokenizer, self.context_length)
        self.preprocess = make_preprocess(self.processor)  # eval: the processor's exact float path
        # Training: workers send uint8 crops; normalisation (and augmentation) run on the device.
        self.train_preprocess = make_fast_preprocess(self.processor) if d.fast_preprocess else self.preprocess

    def _build_engine(self) -> tuple[int, int]:
        """The model under DeepSpeed, parameters aligned; returns (trainable, total) parameter counts."""
        cfg = self.cfg
        siglip = cfg.loss.name == "siglip"
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        module = build_model(
            cfg.model, self.tokenizer, use_bias=siglip, init_scale=math.log(10.0) if siglip else None
        )
        counts = count_parameters(module)
        self.engine = build_engine(module, cfg.train, self.info.world_size, self.device)
        return counts

    def _build_loss(self) -> None:
        """The contrastive loss with negatives from all ranks."""
        cfg, info = self.cfg, self.info
        self.loss_fn = build_loss_from_config(cfg.loss, rank=info.rank, world_size=info.world_size)

    def _build_data(self) -> None:
        """This rank's training stream (the validation spec was checked first: `_agree_on_val_shards`)."""
        from vutrain.data.device_transform import make_device_transform
        from vutrain.data.webdataset import TrainStream

        d, info = self.cfg.data, self.info
        self.stream = TrainStream(
            d.train_shards,
            preprocess=self.train_preprocess,
            tokenize=self.tokenize,
            batch_size=self.cfg.train.micro_batch_size,
            rank=info.rank,
            world_size=info.world_size,
            num_workers=d.num_workers,
            seed=self.cfg.seed,
            caption_template=d.caption_template,
            shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled,
            num_samples=d.num_samples or None,
            local_world_size=info.local_world_size,
            prefetch_factor=d.prefetch_factor,
            positives=self.cfg.loss.positives,
            # The run's device, not the machine's: a CPU run on a GPU machine would open a CUDA
            # context per rank to pin batches that no GPU reads.
            pin_memory=self.device.type == "cuda",
        )
        self.pixel_transform = make_device_transform(
            self.processor,
            d.random_resized_crop,
            seed=self.cfg.seed,
            rank=info.rank,
            position=lambda: self.stream.batches_seen,
        )
        self.data_wait = DataWaitWatch(d.stall_warning_s, info.rank, self._describe_loader)

    def _describe_loader(self) -> str:
        """What a data-wait warning says about this rank's loader (read only when one is due)."""
        workers, shards = self.stream.num_workers, len(self.stream.shards)
        per_worker = shards / (self.info.world_size * max(1, workers))
        readers = f"{workers} loader workers" if workers else "no loader workers (read in this process)"
        return f"{readers}, {shards} shards over {self.info.world_size} ranks: {per_worker:.1f} per worker"

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The trainer's own resumable state (JSON-able): step, data stream position, the non-finite
        guard's state and whether a pre-emption left this step's eval owed."""
        return {
            "step": self.step,
            "data": self.stream.state_dict(),
            **self.guard.state_dict(),  # the non-finite streak and the logging interval's sums
            "eval_pending": self._eval_pending,
            "finished": self._finished,
            # The logging interval's step time so far: a row after a resume between two logging
            # steps averaged only the steps after it (train/step_time and samples/s).
            "interval_wall": self._interval_wall,
            "interval_steps": self._interval_steps,
            "interval_terms": self._terms.state_dict(),  # the loss terms' sums, as the guard's loss sum
            "interval_grad_norm_max": self._norm_max.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (as read back from the checkpoint's JSON)."""
        self.step = int(state["step"])
        self.guard.load_state_dict(state)
        self._eval_pending = bool(state.get("eval_pending", False))
        self._finished = bool(state.get("finished", False))
        self._interval_wall = float(state.get("interval_wall", 0.0))
        self._interval_steps = int(state.get("interval_steps", 0))
        self._terms.load_state_dict(state.get("interval_terms") or {}, self.device)
        self._norm_max.load_state_dict(state.get("interval_grad_norm_max"), self.device)
        self._load_data_position(state["data"])

    def _load_data_position(self, data: dict) -> None:
        """The saved data position, or with data.restart_stream the next epoch's start when that
        position does not fit the shards or data settings (a refused position is one line).

        Only a position that does not fit is restarted: the key left on a requeued job's command
        line must not throw away the exact position of the checkpoints written after the restart.
        """
        from vutrain.data.epoch_remainder import StreamStateError

        try:
            self.stream.load_state_dict(data)
        except StreamStateError as exc:
            if not self.cfg.data.restart_stream:
                raise
            epoch = self.stream.restart_after(data)
            log.warning(
                "data.restart_stream=true: the data position of step %d was not restored (%s); the "
                "weights, optimizer, LR schedule and step were; the stream reads data.train_shards "
                "(%d shards) from the start of epoch %d",
                self.step,
                getattr(exc, "reason", exc),
                len(self.stream.shards),
                epoch,
            )

    def _maybe_resume(self) -> None:
        """Load the newest complete checkpoint (see vutrain/checkpoint.py), or start afresh.

        Metrics rows past the resumed step (or every row, on a fresh start over a killed run's
        metrics.jsonl) move to metrics.discarded.jsonl, so each step appears once.
        """
        resume = self.cfg.train.resume
        target = ckpt.resolve_resume(resume, self.run_dir, verbose=self.info.is_main)
        if target is None:  # train.resume=never moved the last run aside already (_prepare_run_dir)
            self._order_run_files(rolled_back_from=None)
            return
        state = ckpt.load_checkpoint(self.engine, *target, rank=self.info.rank)
        self.load_state_dict(state)
        self._checkpoint_step = self.step
        rolled_back = resume != "auto"  # the later checkpoints are no longer this run's future
        if rolled_back:
            barrier()  # every rank has loaded before rank 0 moves anything
        self._order_run_files(rolled_back_from=os.path.join(*target) if rolled_back else None)
        log.info("resuming at step %d from %s/%s", self.step, *target)

    def _order_run_files(self, rolled_back_from: str | None) -> None:
        """Rank 0 moves a roll-back's later checkpoints aside and metrics.jsonl's rows past the step
        out; every rank waits for it, and stops with rank 0's error, in one line, if it failed.

        Raised on rank 0 alone (a full disk, a permission error), it left the other ranks in
        training's first collective, waiting for a partner that had stopped: on NCCL until the
        group's timeout (30 minutes), while rank 0 alone said why."""
        failure = None
        if self.info.is_main:
            try:
                if rolled_back_from is not None:
                    ckpt.set_aside_later(self.run_dir, rolled_back_from, self.step)
                # The owed eval runs first only where eval stays on (`_train`): then its earlier row goes.
                evals = bool(self.cfg.eval.every and self.cfg.data.val_shards)
                self.metrics.truncate_after(self.step, eval_owed=self._eval_pending and evals)
            except Exception as exc:  # told to every rank below, then raised on each
                failure = exc
        said = None if failure is None else self._run_files_error(failure)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            box = [said]
            # The broadcast is the barrier: a rank passes it once rank 0 is done or has failed.
            torch.distributed.broadcast_object_list(box, src=0, device=self.device)
            said = box[0]
        if said is not None:
            raise ckpt.CheckpointError(said) from failure

    def _run_files_error(self, failure: Exception) -> str:
        """The line every rank stops with when rank 0's `_order_run_files` failed."""
        where = f"resuming at step {self.step}" if self._checkpoint_step is not None else "starting afresh"
        return (
            f"rank 0 could not put the run's files in order after {where} in {self.run_dir} "
            f"({one_line(failure)}): free space there or fix what the error names, then rerun with "
            "the same settings"
        )

    def save(self) -> None:
        """Checkpoint on every rank (collective): written under a temporary name, then published."""
        ckpt.save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            self.state_dict(),
            self.info.rank,
            self.cfg.train.keep_checkpoints,
        )
        self._checkpoint_step = self.step

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> dict:
        """SIGUSR1 (SLURM's pre-emption warning) and SIGTERM: checkpoint at the next step, then exit.

        Returns the handlers they replace, for `restore_signal_handlers` when the run ends.

        Only the main thread may install handlers: a run in another thread (a tuner's trial, an app's
        worker thread) failed after the whole build with "signal only works in main thread". It
        trains without them, and says that a pre-emption signal is then not checkpointed.
        """
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "training outside the main thread: SIGUSR1/SIGTERM cannot be caught here, so a pre-emption "
                "signal will not save a checkpoint; call train() from the main thread to keep that"
            )
            return {}

        def handler(signum, _frame):
            self._signal = signal.Signals(signum).name

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    @staticmethod
    def restore_signal_handlers(previous: dict) -> None:
        """Put back what `install_signal_handlers` replaced. Left installed, they outlived the run in
        a process that goes on (a notebook, a sweep calling train.main): SIGTERM no longer ended
        it, and their hold on the Trainer kept its loader workers alive."""
        for sig, handler in previous.items():
            # None: a handler not set from Python, which signal.signal cannot take back
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    # ------------------------------------------------------------------ loop

    def _sync(self) -> None:
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize()

    def next_batch(self) -> dict:
        """The next micro-batch of this rank, its tensors on the device, pixels normalised there.

        With loss.positives=category|tags the batch also carries this rank's `labels`.
        """
        # A stuck read (a hung mount, a deadlocked worker) was silent forever: warn past a threshold.
        batch = self.data_wait.next(self.stream, step=self.step + 1)
        mask = text_attention_mask(batch["attention_mask"])  # None when right-padded: no host sync
        out = {
            "pixel_values": self.pixel_transform(batch["pixel_values"], self.device, self.dtype),
            "input_ids": batch["input_ids"].to(self.device, non_blocking=True),
            "attention_mask": None if mask is None else mask.to(self.device, non_blocking=True),
        }
        if "labels" in batch:
            out["labels"] = batch["labels"].to(self.device, non_blocking=True)
        return out

    def forward_loss(self, batch: dict, times: StepTimes) -> torch.Tensor:
        """Forward through the engine and the loss: this rank's scalar loss (not yet agreed on)."""
        t0 = time.perf_counter()
        img, txt, scale, bias = self._forward(batch)
        self._sync()
        t1 = time.perf_counter()
        extra = {"labels": batch["labels"]} if "labels" in batch else {}
        loss = self.loss_fn(img, txt, scale, bias, **extra)
        self._sync()
        times.forward += t1 - t0
        times.loss += time.perf_counter() - t1
        self._last_scale = scale.detach()
        return loss

    def _forward(self, batch: dict, towers: tuple = ("image", "text")) -> tuple:
        """The engine's (image features, text features, logit scale, logit bias), ready for the loss.

        `towers`: which to run; the other's features are None (GradCache skips a locked tower's replay).
        """
        img, txt, scale, bias = self.engine(
            pixel_values=batch["pixel_values"] if "image" in towers else None,
            input_ids=batch["input_ids"] if "text" in towers else None,
            attention_mask=batch["attention_mask"] if "text" in towers else None,
        )
        img, txt = features_for_loss(
            self.loss_fn, img, txt, bias, batch.get("labels"), self.device.type, self.cfg.train.precision
        )
        return img, txt, scale.float(), None if bias is None else bias.float()

    def backward_step(self, loss: torch.Tensor, times: StepTimes) -> None:
        """Backward and `engine.step()` for every micro-batch, skipped ones included (their loss and
        gradients are zero), so DeepSpeed's accumulation boundary stays where it belongs."""
        t0 = time.perf_counter()
        self.engine.backward(loss)
        self._sync()
        t1 = time.perf_counter()
        self.engine.step()
        self._sync()
        times.backward += t1 - t0
        times.optimizer += time.perf_counter() - t1

    def train_step(self) -> tuple[StepTimes, bool]:
        """One optimizer step of grad_accum_steps micro-batches, without a host sync.

        Returns (timings, whether this rank received a stop signal). Losses, skips and the stop
        agreed by all ranks accumulate on the device; `read_stats()` fetches them.
        """
        # The LR this step's optimizer call uses: engine.step() advances the schedule at the
        # step's boundary, after which get_lr() is the next step's. A Python float: no device read.
        self._step_lr = (self.engine.get_lr() or [self.cfg.train.lr])[0]
        if self.cfg.train.accumulation == "gradcache" and self.cfg.train.grad_accum_steps > 1:
            return self._gradcache_step()
        times = StepTimes()
        for _ in range(self.cfg.train.grad_accum_steps):
            if self._signal:
                self.guard.request_stop()
            t0 = time.perf_counter()
            batch = self.next_batch()
            times.data += time.perf_counter() - t0
            loss = self.forward_loss(batch, times)
            agreed = self.guard.agree(loss)
            self.stop_check.note_agreed()
            self._terms.add(self.loss_fn.last_terms, self.guard.skip)
            self.backward_step(agreed, times)
        return times, bool(self._signal)

    def _gradcache_step(self) -> tuple[StepTimes, bool]:
        """train.accumulation=gradcache: one loss over every micro-batch of the step (gradcache.py).

        The guard agrees once per step on the step's loss; the replayed backward and
        `engine.step()` run for every micro-batch even when the step is skipped (its gradients are
        masked to zero), so the engine's accumulation boundary stays in place.
        """
        from vutrain.gradcache import GradCache
        from vutrain.losses.positives import concat_labels

        if self._signal:
            self.guard.request_stop()
        times, t0 = StepTimes(), time.perf_counter()
        batches = [self.next_batch() for _ in range(self.cfg.train.grad_accum_steps)]
        labels = concat_labels([b["labels"] for b in batches]) if "labels" in batches[0] else None
        t1 = time.perf_counter()

        def loss_fn(img, txt, scale, bias):
            self._last_scale = scale.detach()
            return self.loss_fn(img, txt, scale, bias, **({"labels": labels} if labels is not None else {}))

        # A locked tower (LiT) gets no gradient: GradCache forwards it once, not again in the replay.
        m = self.cfg.model
        locked = "image" if m.lock_image else "text" if m.lock_text else None
        cache = GradCache(self.engine, self._forward, loss_fn, locked)
        loss = cache.forward(batches)
        self._sync()
        t2 = time.perf_counter()
        # The step's k micro-batches count as k, as in plain accumulation: train/nonfinite_skipped
        # and the train.max_nonfinite_steps streak mean the same under both.
        self.guard.agree(loss, micro_batches=self.cfg.train.grad_accum_steps)
        self.stop_check.note_agreed()
        self._terms.add(self.loss_fn.last_terms, self.guard.skip, self.cfg.train.grad_accum_steps)
        cache.backward()
        self._sync()
        times.data, times.forward, times.backward = t1 - t0, t2 - t1, time.perf_counter() - t2
        return times, bool(self._signal)

    def read_stats(self) -> GuardStats:
        """Host copy of the loss and skip statistics since the last read: the one sync per logged step."""
        stats = self.guard.read()
        if stats.skipped:
            log.warning(
                "non-finite loss: %d micro-batch(es) skipped on every rank by step %d (%d in a row)",
                stats.skipped,
                self.step,
                stats.in_row,
            )
        self.last_stats = stats
        return stats

    def _grad_norm(self) -> float | None:
        """The global gradient norm before clipping of the last optimizer step (all ranks, unscaled),
        or None where the engine reports none (ZeRO-0 fp32/amp_bf16 report one: grad_norm.py).

        DeepSpeed keeps it on the device under ZeRO for its clipping; read on logging steps only,
        after the guard's read, so the device has finished it. DeepSpeed's -1 for a NaN/inf
        gradient (bf16 ZeRO-1/2) reads inf, as its overflow path sets."""
        return logged_step_norm(engine_grad_norm(self.engine), self.device, self._step_skipped())

    def _step_skipped(self) -> torch.Tensor:
        """Whether the non-finite guard skipped the last step (device bool): its norm reads inf on
        every path (the step-time mask reports -1, the per-parameter hooks' zeroed gradients 0)."""
        return self.guard.step_skipped(self.cfg.train.grad_accum_steps)

    def _overflow_skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped on a gradient overflow since the run started (resumes
        included: the engine's checkpoint keeps the count). Host ints: no device read."""
        return int(getattr(self.engine, "skipped_steps", 0))

    def _log_step(self, times: StepTimes, step_time: float, stats: GuardStats) -> None:
        cfg = self.cfg.train
        overflow = self._overflow_skipped_steps()
        if overflow > self._overflow_seen:
            log.warning(
                "gradient overflow: DeepSpeed skipped %d optimizer step(s) by step %d (%d since the start"
                "%s); the weights and the LR schedule did not move on those steps",
                overflow - self._overflow_seen,
                self.step,
                overflow,
                "; fp16's loss scale halves on each and a few at the start are normal"
                if cfg.precision == "fp16"
                else "",
            )
            self._overflow_seen = overflow
        if stats.zeroed_new:
            log.warning(
                "non-finite gradient under a finite loss: %d optimizer step(s) by step %d (%d since the "
                "start) had their gradients zeroed; weight decay and the LR schedule still moved",
                stats.zeroed_new,
                self.step,
                stats.zeroed_steps,
            )
        per_rank = cfg.micro_batch_size * cfg.grad_accum_steps / max(step_time, 1e-9)
        # Every rank logs on the same steps, so this collective matches; on the device for NCCL.
        from vutrain.data.samples import lost_and_ignored  # the data stack loads only when training

        # Lost samples and ignored members apart: a sample that trains without its second image
        # (`ignored_member`) is not a lost sample.
        counts = lost_and_ignored(self.stream.skipped())
        skipped = torch.tensor([float(n) for n in counts], device=self.device)
        all_reduce(skipped)
        lost, ignored = skipped.tolist()
        row = {
            "train/loss": stats.mean_loss,
            "train/logit_scale": float(self._last_scale) if self._last_scale is not None else float("nan"),
            "train/nonfinite_skipped": stats.skipped,
            "train/overflow_skipped_steps": overflow,
            "train/zeroed_nonfinite_grad_steps": stats.zeroed_steps,
        }
        loss_scale = getattr(self.engine.optimizer, "loss_scale", None) if cfg.precision == "fp16" else None
        if isinstance(loss_scale, int | float):  # DeepSpeed's fp16 optimizers: a host number
            row["train/loss_scale"] = float(loss_scale)
        grad_norm = self._grad_norm()
        if grad_norm is not None:
            row["train/grad_norm"] = grad_norm
        norm_max = self._norm_max.read()
        if norm_max is not None:
            row["train/grad_norm_max"] = norm_max
        # align_uniform's two terms: interval means, weighted as train/loss
        row.update({f"train/{k}": v for k, v in self._terms.read(stats.good).items()})
        row.update(
            {
                "train/lr": self._step_lr,
                "train/samples_per_s": per_rank * self.info.world_size,
                "train/samples_per_s_per_rank": per_rank,
                "train/step_time": step_time,
                "train/data_time": times.data,
                "train/forward_time": times.forward,
                "train/loss_time": times.loss,
                "train/backward_time": times.backward,
                "train/optimizer_time": times.optimizer,
                "train/skipped_samples": lost,  # all ranks, since the start of the run
                "train/ignored_members": ignored,
                "train/epoch": self.stream.epoch,
            }
        )
        self.metrics.write(self.step, row)

    def _count_in_interval(self, t0: float) -> None:
        """Add this step (begun at `t0`, its device read included) to the interval's wall time."""
        self._interval_wall += time.perf_counter() - t0
        self._interval_steps += 1

    def _log_interval(self, times: StepTimes, t0: float, stats: GuardStats) -> None:
        """Write the row of the interval that ends with this step (begun at `t0`) and start the next."""
        self._count_in_interval(t0)
        self._log_step(times, self._interval_wall / self._interval_steps, stats)
        self._interval_wall, self._interval_steps = 0.0, 0

    def run_eval(self, checkpointed: bool = False) -> dict:
        """Evaluate now (every rank), write the metrics row and log it on rank 0.

        A pre-emption signal during the eval stops it between two batches on every rank and
        pre-empts (`_preempt`): the checkpoint of this step owes the eval, which the requeued job
        runs first. It used to be acted on only at the next step, and an eval longer than SLURM's
        warning (a large held-out set; the final eval has no next step) ran into the kill: no
        checkpoint since the last periodic one, no requeue. `checkpointed`: this step's checkpoint
        exists already (the owed eval of a resume), so none is written again."""
        try:
            metrics = self.evaluator(self.engine, stop_requested=lambda: self._signal is not None)
        except EvalInterrupted:
            log.warning("a pre-emption signal stopped the eval at step %d", self.step)
            self._preempt(save=not checkpointed)
        self.metrics.write(self.step, metrics)
        if self.info.is_main:
            shown = {k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items()}
            log.info("eval at step %d: %s", self.step, shown)
        return metrics

    def train(self) -> dict:
        """Train to train.max_steps with periodic eval and checkpoints; returns the last eval metrics.

        The metrics row's host reads (loss, skip counts) happen on logging steps only (every
        train.log_every steps, and the last). The stop conditions (a stop request agreed by all ranks,
        train.max_nonfinite_steps non-finite losses in a row) are checked after every step,
        without waiting for the device (`StopCheck`): they act one step after the device saw them,
        whatever train.log_every is; logging and checkpoint steps check the current values.
        """
        previous_handlers = self.install_signal_handlers()
        try:
            return self._train()
        finally:
            try:
                self.data_wait.close()  # its watcher thread ends with the run (joins; never raises)
                self.stream.close()  # its loader workers end with the run, not when the process does
            finally:
                try:
                    # Every exit, not only a finished run's: a pre-empted or failed run left its
                    # TensorBoard writer (thread, event file) open in a process that trains again.
                    self.metrics.close()
                finally:
                    try:
                        self.restore_signal_handlers(previous_handlers)
                    finally:
                        self.release_run_dir()

    def _train(self) -> dict:
        cfg = self.cfg
        if self._finished and self.step >= cfg.train.max_steps:
            # A rerun of a finished run (the same command, train.resume=auto) ran the final eval
            # again and logged a second row for the last step.
            log.info(
                "the run finished at step %d already (its final checkpoint): nothing to train; raise "
                "train.max_steps to go on",
                self.step,
            )
            # Still finished: the start cleared last run's end markers (`_prepare_run_dir`).
            self._write_marker("done.json", {"step": self.step})
            if self.info.is_main:
                # A run killed after its final checkpoint, or whose plot failed, had no curves.png,
                # and its rerun, the way to finish it, never drew one. It reads metrics.jsonl only.
                self._plot_curves()
            return logged_eval(self.run_dir, self.step)
        # A finished run continued with a larger train.max_steps is unfinished until its new end:
        # kept from its final checkpoint, the flag went into a pre-emption checkpoint at the new
        # last step, and the requeued job took the run for done (no final eval, no done.json).
        self._finished = False
        if self.step > cfg.train.max_steps:
            # A lowered train.max_steps under an unfinished checkpoint: the run ended at the
            # checkpoint's step, its done.json past the limit, without a word.
            log.warning(
                "resumed at step %d, past train.max_steps=%d: no step is trained; the run ends at step %d "
                "with its final eval and checkpoint (raise train.max_steps to train on)",
                self.step, cfg.train.max_steps, self.step,
            )  # fmt: skip
        self.engine.train()
        # DeepSpeed skips an optimizer step whose gradients overflow (fp16's loss scaler; any
        # inf/NaN gradient under ZeRO-1/2 with a finite loss) without a word outside fp16: the
        # count it keeps (and checkpoints) goes into the metrics, and a warning says when it grows.
        self._overflow_seen = self._overflow_skipped_steps()
        progress = None
        if self.info.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last_eval: dict = {}
        evaluated_at = None  # the step whose eval row metrics.jsonl holds, once known
        if self._eval_pending and cfg.eval.every and cfg.data.val_shards:
            # the eval of the step the pre-emption checkpoint was taken at
            last_eval, evaluated_at = self.run_eval(checkpointed=True), self.step
        elif cfg.data.val_shards and self.step >= cfg.train.max_steps:
            last_eval = self._eval_logged_before_checkpoint()
            evaluated_at = self.step if last_eval else None
        self._eval_pending = False
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                times, _ = self.train_step()
                self._norm_max.add(engine_grad_norm(self.engine), self.device, self._step_skipped())
                self.step += 1
                # The last step logs too: the rest of its interval (losses, non-finite skips and
                # their warning) was never reported, and its stop was first read after the loop.
                logging_step = self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps
                stats = self.read_stats() if logging_step else None
                try:
                    stop = self._check_stop(now=logging_step or self._checkpoint_due())
                except NonFiniteLossError:
                    # The interval's row shows the divergence; it was lost to the raise (every
                    # rank raises at this step: the streak is agreed, so the row's collective matches).
                    self._log_interval(times, t0, stats if stats is not None else self.read_stats())
                    raise
                if stats is None:
                    self._count_in_interval(t0)
                else:
                    self._log_interval(times, t0, stats)
                    if progress is not None:
                        progress.set_postfix(loss=f"{stats.mean_loss:.4f}")
                if progress is not None:
                    progress.update(1)
                if stop:
                    self._preempt()
                if self._eval_due():
                    last_eval, evaluated_at = self.run_eval(), self.step
                if self._checkpoint_due():
                    self.save()
        finally:
            if progress is not None:
                progress.close()
        # A run of non-finite losses at the very end fails too, and a stop agreed in the last step
        # checkpoints before the final eval (the last step logs, so its check in the loop read the
        # current values already: this one is the backstop).
        if self._check_stop(now=True):
            self._preempt()
        if cfg.data.val_shards and evaluated_at != self.step:
            # A run resumed at its last step (a pre-emption during the final eval, a lowered
            # train.max_steps) holds this step's checkpoint already: a pre-emption during this eval
            # wrote it again, a full save inside SLURM's warning window, for the same state.
            last_eval = self.run_eval(checkpointed=self._checkpoint_step == self.step)
        self._finished = True
        self.save()
        self._write_marker("done.json", {"step": self.step})
        if self.info.is_main:
            self._plot_curves()
        return last_eval

    def _eval_logged_before_checkpoint(self) -> dict:
        """The eval row metrics.jsonl holds for the resumed step ({} if none), as rank 0 read it.

        A run resumed at or past train.max_steps from an unfinished checkpoint (a lowered
        train.max_steps) trains nothing; a periodic checkpoint is saved after its step's eval, so
        its final eval ran that eval again and logged a second row for the step. Rank 0's file
        decides for every rank: the eval is collective."""
        found = [logged_eval(self.run_dir, self.step) if self.info.is_main else None]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(found, src=0, device=self.device)
        return found[0]

    def _plot_curves(self) -> None:
        """Draw curves.png, a convenience: a failure (a full disk, matplotlib missing or broken) is
        one warning. It raised after done.json, and the finished run exited 1 with a traceback,
        which SLURM and the launchers report as a failed job."""
        try:
            from vutrain.plots import plot_run

            plot_run(self.run_dir)
        except Exception as exc:
            log.warning(
                "curves.png not written (%s); the run finished, metrics.jsonl holds its curves",
                one_line(exc),
            )

    def _eval_due(self) -> bool:
        """A periodic eval after this step (the loop's, or the one a pre-emption leaves owed)."""
        e = self.cfg.eval
        return bool(e.every) and bool(self.cfg.data.val_shards) and self.step % e.every == 0

    def _checkpoint_due(self) -> bool:
        """A periodic checkpoint after this step (the final one is saved after the loop)."""
        t = self.cfg.train
        return bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0 and self.step < t.max_steps

    def _check_stop(self, now: bool) -> bool:
        """Whether the ranks agreed to stop; raises NonFiniteLossError after too many non-finite
        losses in a row. `now`: the current values (a device read); else the previous step's."""
        worst, stop = self.stop_check.check(now=now)
        if worst >= self.cfg.train.max_nonfinite_steps:
            latest = ckpt.latest_tag(ckpt.checkpoints_dir(self.run_dir))
            raise NonFiniteLossError(
                f"{worst} non-finite losses in a row by step {self.step}; stopping. "
                f"Last good checkpoint: {latest or 'none'} (kept). Lower train.lr, use "
                "train.precision=fp32 or bf16, or check the data."
            )
        return stop

    def _preempt(self, save: bool = True) -> None:
        """Checkpoint (unless `save` is False: this step's exists), leave preempted.json and raise
        Preempted (train.py exits with 75).

        The checkpoint comes before this step's eval (an eval could outlast SLURM's warning), so
        it records that the resumed run owes that eval and runs it first (`_train`)."""
        self._eval_pending = self._eval_due()
        if save:
            self.save()
        signame = self._signal or "peer"
        self._write_marker("preempted.json", {"step": self.step, "signal": signame})
        log.warning("preempted at step %d: checkpoint saved", self.step)
        raise Preempted(self.step, signame)

    def _write_marker(self, name: str, payload: dict) -> None:
        """Rank 0 writes RUN/name whole or not at all (temporary file, fsync, rename).

        Written in place, a kill or a full disk mid-write left a truncated marker (an empty
        done.json, a preempted.json without its step) for the tools that read it, and the
        OSError turned a saved pre-emption (exit 75, requeued) or a finished run into a failure
        with a traceback. The checkpoint, saved before, is the record: a marker that cannot be
        written is one warning."""
        if not self.info.is_main:
            return
        path = os.path.join(self.run_dir, name)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning(
                "%s not written (%s); the checkpoint of step %d holds the run",
                path,
                one_line(exc),
                payload["step"],
            )
        finally:
            if os.path.exists(tmp):  # the write failed: no half marker stays behind
                os.remove(tmp)
