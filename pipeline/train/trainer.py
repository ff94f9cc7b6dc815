"""`freelm train`: the FreeLM recipe under DeepSpeed ZeRO over megatron-core tensor parallelism.

Each optimizer step trains the signal(s) the schedule names, over `grad_accum` language or
`teacher_grad_accum` teacher micro-batches per data-parallel rank. Rank 0 logs both loss streams, teacher
accuracy, learning rate, grad norm, each signal's tokens/s and MFU. Checkpoints carry the step and both
streams' positions; a run directory with a checkpoint resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from pipeline.config import Config, flatten, to_dict
from pipeline.data.lm_dataset import language_dataset
from pipeline.data.loaders import StreamLoader, language_loader, teacher_loader, teacher_mix
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError
from pipeline.hf.load import check_compatible, load_hf_weights
from pipeline.model.freelm import FreeLM
from pipeline.model.layers import attention_kernel
from pipeline.model.size import measure
from pipeline.parallel.distributed import destroy_parallel, init_parallel
from pipeline.parallel.ds_config import DTYPES, deepspeed_config, precision as ds_precision, zero_stage
from pipeline.parallel.engine import build_engine, build_model, compile_blocks, grad_norm
from pipeline.plan import GIB, plan_run
from pipeline.checkpoint import io as checkpoint
from pipeline.train.host_memory import construction_frees_released
from pipeline.train.liveness import phase
from pipeline.train.optim import make_optimizer
from pipeline.train.schedule import LANGUAGE, TEACHER, Schedule, learning_rate
from pipeline.train.throughput import peak_flops

log = logging.getLogger("freelm.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


class StopRequest:
    """SIGUSR1 or SIGTERM (SLURM's warning before the time limit, a scheduler stopping the job) asks for a
    checkpoint and a clean exit at the end of the current step. Ranks agree through an all-reduce, so all of
    them stop after the same step even if the signal reached only some."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _request(self, signum: int, frame: Any) -> None:
        # Repeats change nothing: launchers (torchrun, deepspeed) forward a signal their whole process group
        # already got, and a scheduler that wants the job gone follows up with SIGKILL.
        self.requested = True

    def agreed(self) -> bool:
        return checkpoint.any_rank(self.requested)


@dataclass
class TrainState:
    """What a checkpoint records besides DeepSpeed's own state."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    streams: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class StepResult:
    metrics: dict[str, float]
    # Over all data-parallel ranks: "<signal>_tokens" (real tokens, no padding) per signal trained, and
    # "flops" (the model FLOPs computed on them, forward + backward).
    counts: dict[str, float]
    grad_norm: torch.Tensor | None = None  # where the engine does not report it (ZeRO stage 0 in fp32)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.schedule = Schedule.from_config(cfg.train)
        if cfg.model.vocab_size is None:  # the config resolves it from the tokenizer, when there is one
            raise ConfigError(f"data.tokenizer: no tokenizer directory at {cfg.data.tokenizer!r} (prepare one with "
                              f"`freelm tokenizer train` or `freelm tokenizer import`)")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.ds_config = deepspeed_config(
            cfg.train.ds_config, cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.grad_clip
        )
        self.fp16 = ds_precision(self.ds_config) == "fp16"

        # A run with a checkpoint resumes from it; only a fresh one starts from `init_from`.
        init_from = cfg.train.init_from if checkpoint.latest_tag(self.ckpt_dir) is None else None
        if init_from:
            check_compatible(cfg.model, init_from, cfg.train.init_teacher_task)
        torch.manual_seed(cfg.train.seed)  # identical on every rank: the model is initialised alike
        with phase("building the model and the DeepSpeed engine", announce=True):
            model = build_model(lambda: FreeLM(cfg.model), self.ds_config)
            if init_from:
                stats = load_hf_weights(model, init_from, ps.get_tensor_model_parallel_group(),
                                        cfg.train.init_teacher_task)
                log.info(f"initialised from {init_from}: {stats} on rank 0")
            model.activation_checkpointing = cfg.train.activation_checkpointing
            if cfg.train.compile:
                compile_blocks(model.blocks)
            optimizer, self.optimizer_name = make_optimizer(model, cfg.train, self.ds_config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: learning_rate(s, cfg.train) / cfg.train.lr)
            self.engine = build_engine(model, optimizer, self.ds_config, scheduler)

        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.size = measure(cfg.model, cfg.parallel.tensor_parallel, cfg.data.seq_len)
        self.peak, self.peak_source = peak_flops(cfg.train.peak_tflops)
        self.stop_request = StopRequest()
        self.state = TrainState()
        with phase(f"loading the latest checkpoint in {self.ckpt_dir}", announce=True):
            client_state = checkpoint.load_latest(self.engine, self.ckpt_dir)
        if client_state is not None:
            self.state = TrainState(**client_state["trainer"])
        else:
            torch.manual_seed(cfg.train.seed + 1 + self.dp_rank)  # dropout differs across data-parallel ranks
        with phase("data streams (rank 0 builds or checks the dataset index, the others wait)", announce=True):
            self.streams = self._streams()

    def _streams(self) -> dict[str, StreamLoader]:
        cfg, train = self.cfg, self.train_cfg
        per_step = train.grad_accum * self.dp_size
        language_samples = self.schedule.count(LANGUAGE, train.steps) * per_step * train.micro_batch
        lm = language_dataset(
            cfg.data.corpora, cfg.data.corpus_weights, cfg.data.seq_len, max(language_samples, 1), self.tokenizer,
            train.seed, self.run_dir / "data_cache",
        )
        streams = {
            LANGUAGE: language_loader(lm, train.micro_batch, self.dp_rank, self.dp_size,
                                      num_workers=cfg.data.num_workers),
        }
        if self.schedule.count(TEACHER, train.steps):
            streams[TEACHER] = teacher_loader(cfg.data.teacher, cfg.data.teacher_seq_len, self.tokenizer.special.pad,
                                              train.teacher_micro_batch, self.dp_rank, self.dp_size, train.seed,
                                              num_workers=cfg.data.num_workers,
                                              length_window=cfg.data.teacher_length_window,
                                              grad_accum=train.teacher_grad_accum,
                                              task_weights=cfg.data.teacher_task_weights,
                                              whole_examples=cfg.data.teacher_whole_examples)
        for name, stream in streams.items():
            if name in self.state.streams:
                stream.load_state_dict(self.state.streams[name])
        return streams

    def run(self) -> TrainState:
        """Train to `train.steps` (or `train.exit_after` steps of this job), checkpointing as configured."""
        train, state = self.train_cfg, self.state
        tracker = self._tracker()
        self._log_start()
        iterators = {name: iter(stream) for name, stream in self.streams.items()}
        stop = train.steps if train.exit_after is None else min(train.steps, state.step + train.exit_after)
        status = "FAILED"
        try:
            while state.step < stop:
                start, lr = time.perf_counter(), self.engine.get_lr()[0]
                with phase(f"step {state.step + 1}"):
                    result = self._step(iterators, self.schedule.signals(state.step))
                elapsed = time.perf_counter() - start
                applied = self.engine.was_step_applied()
                state.step += 1
                state.skipped_steps += not applied
                state.consecutive_skips = 0 if applied else state.consecutive_skips + 1
                metrics = self._metrics(result, elapsed, applied, lr)
                if tracker is not None:
                    tracker.log(state.step, metrics)
                if dist.get_rank() == 0 and (state.step % train.log_every == 0 or not applied):
                    log.info(self._progress_line(metrics))
                if state.consecutive_skips >= train.max_consecutive_skips:
                    raise TrainingError(
                        f"non-finite loss or gradients for {state.consecutive_skips} consecutive steps "
                        f"(up to step {state.step}); stopping. Last checkpoint: "
                        f"{checkpoint.latest_tag(self.ckpt_dir) or 'none'} in {self.ckpt_dir}"
                    )
                with phase(f"step {state.step}: the all-reduce that agrees on a stop request"):
                    stopping = self.stop_request.agreed()
                if train.checkpoints and (state.step % train.save_every == 0 or state.step == stop or stopping):
                    with phase(f"saving the checkpoint of step {state.step}", announce=state.step <= train.save_every):
                        self._save()
                if stopping:
                    saved = f"checkpoint at step {state.step} saved" if train.checkpoints else "no checkpoints"
                    log.info(f"stop requested by signal: {saved}, exiting")
                    status = "KILLED"
                    return state
            status = "FINISHED"
        finally:
            self.stop_request.restore()
            if tracker is not None:
                tracker.close(status=status)
        return state

    def _step(self, iterators: dict[str, Any], signals: tuple[str, ...]) -> StepResult:
        """One optimizer step. Each signal it trains contributes its own micro-batches (`grad_accum` language,
        `teacher_grad_accum` teacher), each backward scaled so the step's gradient is the mean over them
        (weighted per signal when both train). Metrics are averaged over micro-batches and data-parallel
        ranks with one all-reduce (and no device sync before it)."""
        train = self.train_cfg
        accum = {LANGUAGE: train.grad_accum, TEACHER: train.teacher_grad_accum}
        weights = {LANGUAGE: train.language_weight, TEACHER: train.teacher_weight} if len(signals) > 1 else \
            dict.fromkeys(signals, 1.0)
        micro_batches = [name for name in signals for _ in range(accum[name])]
        sums: dict[str, torch.Tensor] = {}
        divisors: dict[str, int] = {}
        counts = dict.fromkeys((*(f"{name}_tokens" for name in signals), "flops"), 0.0)
        for index, name in enumerate(micro_batches):
            batch = next(iterators[name])
            tokens, flops = self._work(name, batch)
            counts[f"{name}_tokens"] += tokens
            counts["flops"] += flops
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            with phase(f"{name} forward (ZeRO-3 parameter all-gathers, TP all-reduces)"):
                loss, extra = self._forward(name, batch)
            with phase(f"{name} backward (ZeRO-3 gradient reduce-scatters)"):
                self.engine.backward(weights[name] * loss / accum[name], scale_wrt_gas=False)
            for key, value in {f"loss/{name}": loss.detach(), **extra}.items():
                sums[key] = sums.get(key, 0.0) + value.double()
                divisors[key] = accum[name] * self.dp_size
        with phase("optimizer step"):
            norm = None if hasattr(self.engine.optimizer, "_global_grad_norm") else grad_norm(self.engine.module)
            self.engine.step()
        totals = torch.tensor(list(counts.values()), dtype=torch.float64, device=self.engine.device)
        reduced = torch.cat([torch.stack(list(sums.values())), totals])
        with phase("the all-reduce of the step's metrics over data-parallel ranks"):
            dist.all_reduce(reduced, group=ps.get_data_parallel_group())
        values = reduced.tolist()
        metrics = {key: value / divisors[key] for key, value in zip(sums, values)}
        return StepResult(metrics, dict(zip(counts, values[len(sums):])), norm)

    def _work(self, signal: str, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Real tokens in a micro-batch (padding excluded) and the model FLOPs computed on them."""
        if signal == LANGUAGE:
            rows, seq = batch["tokens"].shape
            return rows * seq, rows * seq * self.size.train_flops_per_token(seq)
        lengths = batch["lengths"].tolist()
        return sum(lengths), self.size.teacher_train_flops(lengths)

    def _forward(self, signal: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if signal == LANGUAGE:
            out = self.engine(batch["tokens"], signal=LANGUAGE, targets=batch["targets"], loss_mask=batch["loss_mask"])
            return out.loss, {}
        out = self.engine(batch["tokens"], signal=TEACHER, lengths=batch["lengths"], labels=batch["labels"])
        accuracy = (out.logits.argmax(dim=-1) == batch["labels"]).float().mean()
        return out.loss, {"teacher/accuracy": accuracy.detach()}

    def _metrics(self, result: StepResult, elapsed: float, applied: bool, lr: float) -> dict[str, float]:
        metrics = dict(result.metrics)
        metrics["train/lr"] = lr
        grad_norm = self.engine.get_global_grad_norm() if result.grad_norm is None else float(result.grad_norm)
        if applied and grad_norm is not None and math.isfinite(grad_norm):
            metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/skipped_steps"] = float(self.state.skipped_steps)
        if self.fp16:
            metrics["train/loss_scale"] = float(self.engine.optimizer.loss_scale)
        for key, value in result.counts.items():
            if key.endswith("_tokens"):
                metrics[f"throughput/{key}_per_s"] = value / elapsed
        metrics["throughput/mfu_percent"] = 100 * result.counts["flops"] / (elapsed * self.peak * dist.get_world_size())
        return metrics

    def _progress_line(self, metrics: dict[str, float]) -> str:
        shown = [f"step {self.state.step}/{self.train_cfg.steps}"]
        for key in ("loss/language", "loss/teacher", "teacher/accuracy", "train/lr", "train/grad_norm"):
            if key in metrics:
                shown.append(f"{key.removeprefix('train/')} {metrics[key]:.4g}")
        for name in (LANGUAGE, TEACHER):
            if f"throughput/{name}_tokens_per_s" in metrics:
                shown.append(f"{metrics[f'throughput/{name}_tokens_per_s']:,.0f} {name} tok/s")
        shown.append(f"MFU {metrics['throughput/mfu_percent']:.1f}%")
        if self.state.consecutive_skips:
            shown.append(f"SKIPPED (non-finite; {self.state.skipped_steps} so far)")
        return " | ".join(shown)

    def _save(self) -> None:
        self.state.streams = {name: stream.state_dict() for name, stream in self.streams.items()}
        checkpoint.save(self.engine, self.ckpt_dir, self.state.step, {"trainer": vars(self.state)})
        if dist.get_rank() == 0:
            if removed := checkpoint.prune(self.ckpt_dir, self.train_cfg.keep_checkpoints, self.train_cfg.keep_every):
                log.info(f"checkpoint: removed {', '.join(removed)} (train.keep_checkpoints, train.keep_every)")

    def _tracker(self):
        if dist.get_rank() != 0 or not self.cfg.tracking.enabled:
            return None
        from pipeline.train.run_info import source_tags
        from pipeline.train.tracking import Tracker

        tracking, parallel = self.cfg.tracking, self.cfg.parallel
        grid = {"world_size": dist.get_world_size(), "tensor_parallel": parallel.tensor_parallel,
                "data_parallel": self.dp_size, "zero_stage": zero_stage(self.ds_config),
                "precision": ds_precision(self.ds_config)}
        ds_json = self.run_dir / "ds_config.json"
        ds_json.write_text(json.dumps(self.ds_config, indent=2) + "\n")
        return Tracker(self.run_dir, uri=tracking.uri, experiment=tracking.experiment,
                       run_name=tracking.run_name or self.run_dir.name, params=flatten(to_dict(self.cfg)),
                       resume_step=self.state.step, system_metrics=tracking.system_metrics,
                       tags=source_tags() | {f"freelm.{key}": str(value) for key, value in grid.items()},
                       artifacts=[self.run_dir / "config.yaml", ds_json])

    def _log_start(self) -> None:
        if dist.get_rank() != 0:
            return
        cfg, size = self.cfg, self.size
        precision = ds_precision(self.ds_config)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        kernel = attention_kernel(cfg.model, cfg.model.n_heads // cfg.parallel.tensor_parallel, cfg.data.seq_len,
                                  DTYPES[precision], device, cfg.model.dropout)
        attention = f"SDPA ({kernel} kernel on {device.type})"
        lines = [
            f"run directory: {self.run_dir.resolve()} (resuming at step {self.state.step})" if self.state.step
            else f"run directory: {self.run_dir.resolve()}",
            f"grid: world {dist.get_world_size()} = TP {cfg.parallel.tensor_parallel} x DP {self.dp_size}; "
            f"ZeRO stage {self.ds_config.get('zero_optimization', {}).get('stage', 0)}; precision {precision}",
            f"model: {size.total_params:,} params ({size.params_per_tp_rank:,} per TP rank), vocab {size.padded_vocab_size}",
            f"kernels: attention {attention}; optimizer {self.optimizer_name}; LM loss fused head + "
            f"vocab-parallel cross-entropy, chunked; norms torch "
            f"{'LayerNorm' if cfg.model.block == 'gpt2' else 'RMSNorm'}; "
            f"blocks {'compiled (torch.compile per block)' if cfg.train.compile else 'eager'}",
            f"schedule: {self.schedule.mode} {cfg.train.language_steps}:{cfg.train.teacher_steps}, "
            f"{cfg.train.steps} steps; MFU against {self.peak / 1e12:.2f} TFLOP/s per device ({self.peak_source})",
        ]
        if TEACHER in self.streams:
            lines.append(teacher_mix(cfg.data.teacher, cfg.data.teacher_task_weights))
        world, gpu = dist.get_world_size(), torch.cuda.is_available()
        memory = plan_run(cfg, nodes=1, gpus_per_node=world, device="gpu" if gpu else "cpu", advise=False).memory
        lines.append(f"plan: {memory.peak / GIB:.2f} GiB per device at peak (params {memory.params / GIB:.2f}, grads "
                     f"{memory.grads / GIB:.2f}, optimizer {memory.optimizer / GIB:.2f}, activations "
                     f"{memory.activations / GIB:.2f}; largest transient: {memory.largest_transient}); freelm plan "
                     f"--config {self.run_dir / 'config.yaml'} for all of it")
        for line in lines:
            log.info(line)


def write_resolved_config(cfg: Config) -> None:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (run_dir / "config.yaml").write_text(text)
    log.info("resolved config:\n" + text)


def largest_activation(cfg: Config) -> int:
    """Bytes of the largest tensor a micro-batch makes on one rank: the MLP's intermediate, in fp32 (CPU runs)."""
    train, data = cfg.train, cfg.data
    tokens = max(train.micro_batch * data.seq_len, train.teacher_micro_batch * data.teacher_seq_len)
    return 4 * tokens * cfg.model.ffn_size // cfg.parallel.tensor_parallel


def train(cfg: Config) -> TrainState:
    """Entry point for every rank (torchrun, the deepspeed launcher or srun set the environment)."""
    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.timeout_minutes)
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if dist.get_rank() == 0:  # index building: what and how long
        logging.getLogger("megatron.core.datasets").setLevel(logging.INFO)
    trainer = None
    try:
        if dist.get_rank() == 0:
            write_resolved_config(cfg)
        with construction_frees_released(largest_activation(cfg)):
            trainer = Trainer(cfg)
        return trainer.run()
    finally:
        if trainer is not None:  # its hooks and DeepSpeed's global tables would keep the model alive
            trainer.engine.destroy()
        destroy_parallel()
