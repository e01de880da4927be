"""The Trainer: builds the engine, runs the loop, evaluates, checkpoints and resumes.

One `Trainer` per process. `train()` loops `train_step()` to `train.max_steps`; the trainer's own
state (step, data stream position, RNG) rides along with each DeepSpeed checkpoint, so a resumed
run produces the same per-step losses as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vutrain import checkpoint as ckpt
from vutrain.config import RunConfig, save_config
from vutrain.distributed import DistInfo, barrier
from vutrain.ds_config import build_ds_config
from vutrain.evaluate import evaluate
from vutrain.losses import build_loss
from vutrain.metrics import MetricsWriter
from vutrain.model import build_model, count_parameters, tokenizer_and_processor
from vutrain.optim import build_optimizer, param_groups

log = logging.getLogger("vutrain")
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", which the SLURM scripts turn into a requeue
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; train.py exits with PREEMPT_EXIT_CODE."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"preempted at step {step} by {signame}")
        self.step, self.signame = step, signame


@dataclass
class StepTimes:
    data: float = 0.0
    forward: float = 0.0
    loss: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    values: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: RunConfig, info: DistInfo, sync_timing: bool = False):
        import deepspeed
        from vutrain.data.preprocess import make_preprocess
        from vutrain.data.tokenizer import make_tokenize
        from vutrain.data.webdataset import TrainStream

        self.cfg, self.info = cfg, info
        self.run_dir = cfg.output_dir
        self.sync_timing = sync_timing  # bench: synchronise the GPU around each phase
        self.device = torch.device(info.device)
        self.dtype = DTYPES[cfg.train.precision]
        if info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            for stale in ("preempted.json", "done.json"):
                if os.path.exists(os.path.join(self.run_dir, stale)):
                    os.remove(os.path.join(self.run_dir, stale))
        barrier()

        d = cfg.data
        self.tokenizer, self.processor, self.context_length = tokenizer_and_processor(
            cfg.model, self.run_dir, d.train_shards, d.caption_template, d.tokenizer_samples,
            info.is_main, barrier)
        self.tokenize = make_tokenize(self.tokenizer, self.context_length)
        self.preprocess = make_preprocess(self.processor)

        siglip = cfg.loss.name == "siglip"
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        module = build_model(cfg.model, self.tokenizer, use_bias=siglip,
                             init_scale=math.log(10.0) if siglip else None)
        trainable, total = count_parameters(module)
        ds_config = build_ds_config(cfg.train, info.world_size)
        if "optimizer" in ds_config:  # the user's ds_config brings its own (e.g. CPU-offload Adam)
            self.engine, _, _, _ = deepspeed.initialize(
                model=module, model_parameters=param_groups(module, cfg.train.weight_decay), config=ds_config)
        else:
            optimizer, scheduler = build_optimizer(module, cfg.train)
            self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                        lr_scheduler=scheduler, config=ds_config)
        self.loss_fn = build_loss(cfg.loss.name, rank=info.rank, world_size=info.world_size,
                                  backend=cfg.loss.backend, local_loss=cfg.loss.local_loss,
                                  gather_with_grad=cfg.loss.gather_with_grad)
        # The torch loss upcasts bf16/fp16 features to fp32 (a bf16 logits matrix loses the label
        # term); the Triton kernels take them as they are and accumulate in fp32 themselves.
        self.upcast_features = not (cfg.loss.backend in ("triton", "auto") and self.device.type == "cuda")
        self.stream = TrainStream(d.train_shards, preprocess=self.preprocess, tokenize=self.tokenize,
                                  batch_size=cfg.train.micro_batch_size, rank=info.rank,
                                  world_size=info.world_size, num_workers=d.num_workers, seed=cfg.seed,
                                  caption_template=d.caption_template, shuffle_buffer=d.shuffle_buffer,
                                  resampled=d.resampled, num_samples=d.num_samples or None)
        if d.val_shards:  # a typo in the eval path must fail now, not at the first eval
            from vutrain.data.shards import expand_shards
            expand_shards(d.val_shards, "data.val_shards")
        self.metrics = MetricsWriter(self.run_dir, enabled=info.is_main)
        self.step = 0
        self.nonfinite_in_row = 0
        self._signal: str | None = None
        self._classes: list[str] | None = None
        log.info("world_size=%d launcher=%s device=%s backend=%s", info.world_size, info.launcher,
                 info.device, info.backend)
        log.info("parameters: %d trainable of %d; zero stage %d, %s; %d steps/epoch",
                 trainable, total, cfg.train.zero_stage, cfg.train.precision, self.stream.steps_per_epoch)
        self._maybe_resume()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The trainer's own state (JSON-able): step, data stream position, non-finite streak."""
        return {"step": self.step, "data": self.stream.state_dict(), "nonfinite_in_row": self.nonfinite_in_row}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (as read back from the checkpoint's JSON)."""
        self.step = int(state["step"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.stream.load_state_dict(state["data"])

    def _maybe_resume(self) -> None:
        """Load the newest complete checkpoint (see vutrain/checkpoint.py), or start afresh.

        Metrics rows past the resumed step (or every row, on a fresh start over a killed run's
        metrics.jsonl) move to metrics.discarded.jsonl, so each step appears once.
        """
        resume = self.cfg.train.resume
        target = ckpt.resolve_resume(resume, self.run_dir, verbose=self.info.is_main)
        if target is None:
            if resume == "never" and self.info.is_main:
                ckpt.move_aside(self.run_dir)
            self.metrics.truncate_after(0)
            barrier()
            return
        state = ckpt.load_checkpoint(self.engine, *target, rank=self.info.rank)
        self.load_state_dict(state)
        self.metrics.truncate_after(self.step)
        log.info("resuming at step %d from %s/%s", self.step, *target)

    def save(self) -> None:
        """Checkpoint on every rank (collective): written under a temporary name, then published."""
        ckpt.save_checkpoint(self.engine, self.run_dir, self.step, self.state_dict(), self.info.rank,
                             self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """SIGUSR1 (SLURM's pre-emption warning) and SIGTERM: checkpoint at the next step, then exit."""
        def handler(signum, _frame):
            self._signal = signal.Signals(signum).name
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    # ------------------------------------------------------------------ loop

    def _sync(self) -> None:
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize()

    def _agree(self, loss: torch.Tensor) -> tuple[float, bool, bool]:
        """All ranks agree on (mean loss, any non-finite, any stop signal) with one collective.

        Reading the loss on the host is the one sync per micro-batch: every rank must know
        before backward whether any rank's loss is non-finite, or they would diverge.
        """
        value = loss.detach().float().item()
        finite = math.isfinite(value)
        flags = torch.tensor([value if finite else 0.0, 0.0 if finite else 1.0, float(bool(self._signal))])
        if self.info.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return flags[0].item() / self.info.world_size, bool(flags[1] > 0), bool(flags[2] > 0)

    def train_step(self) -> tuple[StepTimes, bool]:
        """One optimizer step of grad_accum_steps micro-batches. Returns (timings, stop requested)."""
        times, engine = StepTimes(), self.engine
        losses, stop = [], False
        for _ in range(self.cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(self.stream)
            t1 = time.perf_counter()
            img, txt, scale, bias = engine(pixel_values=batch["pixel_values"].to(self.device, self.dtype),
                                           input_ids=batch["input_ids"].to(self.device),
                                           attention_mask=batch["attention_mask"].to(self.device))
            self._sync()
            t2 = time.perf_counter()
            if self.upcast_features:
                img, txt = img.float(), txt.float()
            loss = self.loss_fn(img, txt, scale.float(), None if bias is None else bias.float())
            self._sync()
            t3 = time.perf_counter()
            mean_loss, nonfinite, stop_now = self._agree(loss)
            stop = stop or stop_now
            if nonfinite:
                # Dropping the micro-batch on every rank keeps the ranks in step; the optimizer
                # and LR schedule do not advance for it.
                self.nonfinite_in_row += 1
                log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped",
                            self.step + 1, self.nonfinite_in_row)
                times.data += t1 - t0
                continue
            self.nonfinite_in_row = 0
            engine.backward(loss)
            self._sync()
            t4 = time.perf_counter()
            engine.step()
            self._sync()
            t5 = time.perf_counter()
            losses.append(mean_loss)
            times.data += t1 - t0
            times.forward += t2 - t1
            times.loss += t3 - t2
            times.backward += t4 - t3
            times.optimizer += t5 - t4
        times.values = {"train/loss": sum(losses) / len(losses) if losses else float("nan"),
                        "train/logit_scale": scale.detach().float().item()}
        if self.loss_fn.last_terms:  # align_uniform's two terms
            times.values.update({f"train/{k}": float(v) for k, v in self.loss_fn.last_terms.items()})
        return times, stop

    def _log_step(self, times: StepTimes, step_time: float) -> None:
        cfg = self.cfg.train
        per_rank = cfg.micro_batch_size * cfg.grad_accum_steps / max(step_time, 1e-9)
        skipped = torch.tensor([float(sum(self.stream.skipped().values()))])
        if self.info.world_size > 1:  # every rank logs on the same steps, so this collective matches
            dist.all_reduce(skipped)
        row = dict(times.values)
        row.update({
            "train/lr": (self.engine.get_lr() or [cfg.lr])[0],
            "train/samples_per_s": per_rank * self.info.world_size,
            "train/samples_per_s_per_rank": per_rank,
            "train/step_time": step_time, "train/data_time": times.data,
            "train/forward_time": times.forward, "train/loss_time": times.loss,
            "train/backward_time": times.backward, "train/optimizer_time": times.optimizer,
            "train/skipped_samples": skipped.item(),  # all ranks, since the start of the run
            "train/epoch": self.stream.epoch,
        })
        self.metrics.write(self.step, row)

    def run_eval(self) -> dict:
        from vutrain.data.val import collect_label_values, iter_val_batches
        cfg = self.cfg
        batches = iter_val_batches(cfg.data.val_shards, preprocess=self.preprocess, tokenize=self.tokenize,
                                   batch_size=cfg.eval.batch_size, rank=self.info.rank,
                                   world_size=self.info.world_size, caption_template=cfg.data.caption_template,
                                   label_field=cfg.eval.zeroshot_field)
        if self._classes is None:  # the validation shards do not change during a run
            self._classes = collect_label_values(cfg.data.val_shards, cfg.eval.zeroshot_field)
        classes = self._classes
        size = self.processor.crop_size["height"] if isinstance(self.processor.crop_size, dict) else 224
        dummy = dict(self.tokenize([""]), pixel_values=torch.zeros(1, 3, size, size), labels=[""])
        metrics = evaluate(self.engine, batches, classes, list(cfg.eval.templates), self.tokenize,
                           self.dtype, self.device, dummy)
        self.metrics.write(self.step, metrics)
        if self.info.is_main:
            shown = {k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items()}
            log.info("eval at step %d: %s", self.step, shown)
        return metrics

    def train(self) -> dict:
        cfg = self.cfg
        self.install_signal_handlers()
        self.engine.train()
        progress = None
        if self.info.is_main and cfg.train.progress_bar:
            from tqdm import tqdm
            progress = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last_eval: dict = {}
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                times, stop = self.train_step()
                self.step += 1
                if self.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                    latest = ckpt.latest_tag(ckpt.checkpoints_dir(self.run_dir))
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}; stopping. "
                        f"Last good checkpoint: {latest or 'none'} (kept). Lower train.lr, use "
                        "train.precision=fp32 or bf16, or check the data.")
                if self.step % cfg.train.log_every == 0:
                    self._log_step(times, time.perf_counter() - t0)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{times.values['train/loss']:.4f}")
                if stop:
                    self.save()
                    self._write_marker("preempted.json", {"step": self.step, "signal": self._signal or "peer"})
                    log.warning("preempted at step %d: checkpoint saved", self.step)
                    raise Preempted(self.step, self._signal or "peer")
                if cfg.eval.every and cfg.data.val_shards and self.step % cfg.eval.every == 0:
                    last_eval = self.run_eval()
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 \
                        and self.step < cfg.train.max_steps:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
        if cfg.data.val_shards and not (cfg.eval.every and self.step % cfg.eval.every == 0 and last_eval):
            last_eval = self.run_eval()
        self.save()
        self._write_marker("done.json", {"step": self.step})
        if self.info.is_main:
            from vutrain.plots import plot_run
            plot_run(self.run_dir)
        self.metrics.close()
        return last_eval

    def _write_marker(self, name: str, payload: dict) -> None:
        if self.info.is_main:
            with open(os.path.join(self.run_dir, name), "w", encoding="utf-8") as fh:
                json.dump(payload, fh)
