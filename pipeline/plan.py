"""`freelm plan`: what a run will need, before it is submitted. Arithmetic only: no process is started and no
device touched (the model is built on the meta device to count its parameters).

Per device, the plan counts what DeepSpeed actually allocates for the recipe's ZeRO stage, precision and
offload settings (its fp32 master copy is kept even when training in fp32), the activations our blocks save
for backward (measured against a real run by benchmarks/memory.py), and the largest short-lived buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.model.lm_loss import chunk_positions
from pipeline.model.size import ModelSize, measure
from pipeline.parallel.ds_config import deepspeed_config, precision as ds_precision, zero_stage
from pipeline.train.schedule import LANGUAGE, TEACHER, Schedule

GIB = 1024**3
ASSUMED_VOCAB = 50257  # GPT-2's BPE, when neither model.vocab_size nor a prepared tokenizer says otherwise
GPU_RUNTIME_BYTES = int(1.5 * GIB)  # CUDA context, NCCL buffers and allocator slack: outside torch's counts
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "sub_group_size": 1e9,
               "stage3_param_persistence_threshold": 1e5, "stage3_max_live_parameters": 1e9,
               "stage3_max_reuse_distance": 1e9}


@dataclass
class Memory:
    """Bytes per device. `peak` = model states + the larger of the forward/backward working set
    (activations, logits, gathered parameters, gradient buckets) and the optimizer step's buffer."""

    params: int
    grads: int
    optimizer: int
    activations: int  # at the recipe's activation-checkpointing setting, the larger of the two signals
    activations_language: int
    activations_teacher: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    logits: int  # the LM head's logits of one micro-batch (fp32, plus the bf16/fp16 ones they come from)
    zero3_live: int  # parameters gathered for the running block, prefetched, and kept for reuse
    grad_buckets: int  # gradient reduce buckets
    step_buffer: int  # the fp32 gradient copy the optimizer step makes
    runtime: int  # CUDA context and NCCL; 0 on CPU
    peak: int
    largest_transient: str = ""


@dataclass
class Plan:
    recipe: str
    world_size: int
    tensor_parallel: int
    data_parallel: int
    zero_stage: int
    precision: str
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    vocab_size: int
    vocab_source: str
    params_total: int
    params_per_device: int  # one TP rank's share, before ZeRO partitioning
    steps: dict[str, int]
    tokens_per_step: dict[str, int]  # language: micro x accum x DP x seq; teacher: at most (propositions x seq)
    propositions_per_step: int
    tokens_total: dict[str, int]
    memory: Memory
    gpu_memory: int
    fits: bool
    advice: str
    checkpoint_bytes: int
    keep_checkpoints: int  # train.keep_checkpoints (0: all)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def block_activation_bytes(cfg: Config, batch: int, seq: int, tp: int, elem: int, fused_attention: bool) -> int:
    """Bytes one decoder block saves for backward over batch x seq positions on one TP rank,
    counted from our blocks: the norm inputs, the inputs of every linear layer, q/k/v and the attention
    output, the MLP's intermediate tensors and (with dropout) 1-byte masks. Without a fused attention
    kernel the attention probabilities (batch x heads x seq^2) are saved too."""
    m, tokens = cfg.model, batch * seq
    hidden = tokens * m.d_model * elem
    # attn norm input, qkv input, q/k/v, attention output, proj input, mlp norm input, mlp input
    saved = hidden * (4 + 5 / tp)
    mlp_tensors = 2 if m.block == "gpt2" else 4  # GELU input and output; SwiGLU gate, up, silu, product
    saved += mlp_tensors * tokens * m.ffn_size * elem / tp
    if m.dropout:
        saved += 2 * tokens * m.d_model
    if not fused_attention:
        scores = tokens * seq * m.n_heads / tp
        saved += scores * elem + (scores if m.dropout else 0)
    return int(saved)


def activation_bytes(cfg: Config, batch: int, seq: int, tp: int, elem: int, fused: bool, checkpointing: bool) -> int:
    """One micro-batch's saved activations for the whole model: every block's (or, with activation
    checkpointing, every block's input plus one block recomputed at a time) and the final norm's."""
    tokens = batch * seq
    block = block_activation_bytes(cfg, batch, seq, tp, elem, fused)
    layers = cfg.model.n_layers
    kept = layers * tokens * cfg.model.d_model * elem + block if checkpointing else layers * block
    return int(kept + 2 * tokens * cfg.model.d_model * elem)


def assume_vocab(cfg: Config) -> str:
    """Where `model.vocab_size` comes from; without a prepared tokenizer or a pinned size, GPT-2's is set."""
    if cfg.model.vocab_size is not None:
        return f"tokenizer {cfg.data.tokenizer}"
    cfg.model.vocab_size = ASSUMED_VOCAB
    return "GPT-2's, assumed: no tokenizer prepared yet; pass --tokenizer or model.vocab_size"


def plan_run(
    cfg: Config, recipe: str = "", nodes: int = 1, gpus_per_node: int = 8, gpu_memory_gib: float = 80.0,
    device: str = "gpu", advise: bool = True,
) -> Plan:
    """The plan of `cfg` on `nodes` x `gpus_per_node` devices of `gpu_memory_gib` each (`device="cpu"`: the
    same arithmetic for a CPU run, without the GPU runtime and with CPU attention kernels). `advise`: when it
    does not fit, look for the single change that makes it fit."""
    notes = []
    vocab_source = assume_vocab(cfg)
    train, tp = cfg.train, cfg.parallel.tensor_parallel
    world = nodes * gpus_per_node
    if world % tp:
        raise ConfigError(f"parallel.tensor_parallel ({tp}) does not divide {nodes} nodes x {gpus_per_node} devices")
    if tp > gpus_per_node:
        notes.append(f"TP={tp} spans nodes: tensor parallelism needs the intra-node links; keep it <= {gpus_per_node}")
    dp = world // tp
    ds = deepspeed_config(train.ds_config, train.micro_batch, train.grad_accum, train.grad_clip)
    zero = {**DS_DEFAULTS, **ds.get("zero_optimization", {})}
    stage, precision = zero_stage(ds), ds_precision(ds)
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    offload_param = stage == 3 and zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    size = measure(cfg.model, tp, cfg.data.seq_len)
    teacher_params = size.teacher_head_params
    psi = size.params_per_tp_rank + teacher_params

    memory = device_memory(cfg, size, psi, dp, stage, precision, zero, offload_opt, offload_param, device)
    schedule = Schedule.from_config(train)
    steps = {LANGUAGE: schedule.count(LANGUAGE, train.steps), TEACHER: schedule.count(TEACHER, train.steps)}
    per_step = {LANGUAGE: train.micro_batch * train.grad_accum * dp * cfg.data.seq_len,
                TEACHER: train.teacher_micro_batch * train.teacher_grad_accum * dp * cfg.data.teacher_seq_len}
    elem = 4 if precision == "fp32" else 2
    checkpoint = 12 * psi * tp + (elem * psi * tp if stage < 3 else elem * size.vector_params_per_tp_rank * tp)
    capacity = int(gpu_memory_gib * GIB)
    fits = memory.peak <= capacity
    plan = Plan(
        recipe=recipe, world_size=world, tensor_parallel=tp, data_parallel=dp, zero_stage=stage,
        precision=precision, offload_optimizer=offload_opt, offload_params=offload_param,
        activation_checkpointing=train.activation_checkpointing, vocab_size=cfg.model.vocab_size,
        vocab_source=vocab_source, params_total=size.total_params + teacher_params, params_per_device=psi,
        steps=steps, tokens_per_step=per_step,
        propositions_per_step=train.teacher_micro_batch * train.teacher_grad_accum * dp,
        tokens_total={k: steps[k] * per_step[k] for k in steps}, memory=memory, gpu_memory=capacity,
        fits=fits, advice="", checkpoint_bytes=int(checkpoint),
        keep_checkpoints=train.keep_checkpoints, notes=notes,
    )
    if not fits:
        plan.advice = advice(cfg, nodes, gpus_per_node, gpu_memory_gib, device, memory.peak) if advise else \
            f"does not fit: {memory.peak / GIB:.1f} GiB > {gpu_memory_gib:g} GiB"
    return plan


def device_memory(
    cfg: Config, size: ModelSize, psi: int, dp: int, stage: int, precision: str, zero: dict[str, Any],
    offload_opt: bool, offload_param: bool, device: str,
) -> Memory:
    train, tp = cfg.train, cfg.parallel.tensor_parallel
    elem = 4 if precision == "fp32" else 2
    sharded = psi / dp
    # Model states (DeepSpeed keeps an fp32 master copy and two fp32 Adam moments per partition; at stage 0 in
    # fp32 the optimizer steps the weights themselves).
    master = 0 if stage == 0 and precision == "fp32" else 4
    if stage == 3:
        params = 0 if offload_param else elem * (sharded + size.vector_params_per_tp_rank * (1 - 1 / dp))
    else:
        params = elem * psi
    grads = elem * (psi if stage < 2 else sharded)
    optimizer = 0 if offload_opt else (master + 8) * (sharded if stage >= 1 else psi)
    # Working set of a forward/backward.
    fused = device == "gpu" or not cfg.model.dropout
    shapes = ((LANGUAGE, train.micro_batch, cfg.data.seq_len),
              (TEACHER, train.teacher_micro_batch, cfg.data.teacher_seq_len))
    with_ckpt = {s: activation_bytes(cfg, b, n, tp, elem, fused, True) for s, b, n in shapes}
    without = {s: activation_bytes(cfg, b, n, tp, elem, fused, False) for s, b, n in shapes}
    chosen = with_ckpt if train.activation_checkpointing else without
    # The fused LM loss holds one chunk of positions' logits: fp32, their bf16/fp16 matmul output, and in
    # backward the fp32 probabilities.
    shard = size.padded_vocab_size // tp
    logit_elems = min(train.micro_batch * cfg.data.seq_len, chunk_positions(shard)) * shard
    logits = logit_elems * (8 + (elem if elem < 4 else 0))
    # ZeRO-3 holds the running block's parameters, those prefetched ahead of it, and those it will reuse soon
    # (e.g. the last blocks between forward and backward); DeepSpeed's defaults (1e9) can keep a whole model.
    ahead = min(zero["stage3_prefetch_bucket_size"] + zero["stage3_max_reuse_distance"], zero["stage3_max_live_parameters"])
    gathered = min(size.block_params_per_tp_rank + ahead, psi)
    live = elem * gathered if stage == 3 else 0
    if stage >= 1:
        buckets = elem * zero["reduce_bucket_size"] * (2 if zero.get("overlap_comm") else 1)
    else:  # stage 0 all-reduces the gradients flattened, in buckets of DeepSpeed's allreduce_bucket_size (5e8)
        buckets = elem * min(5e8, psi) if dp > 1 else 0
    buckets = min(buckets, 2 * elem * psi)
    working = max(chosen[LANGUAGE] + logits, chosen[TEACHER]) + live + buckets
    if offload_opt:
        step = 0
    elif stage == 3:
        step = 4 * min(zero["sub_group_size"], sharded)
    else:
        step = 4 * sharded if master else 0
    runtime = GPU_RUNTIME_BYTES if device == "gpu" else 0
    transients = {"the fused LM loss's logits chunk": logits, "ZeRO-3 gathered parameters": live,
                  "gradient reduce buckets": buckets, "optimizer step's fp32 gradient copy": step}
    largest = max(transients, key=transients.get)
    states = params + grads + optimizer
    return Memory(
        params=int(params), grads=int(grads), optimizer=int(optimizer), activations=max(chosen.values()),
        activations_language=chosen[LANGUAGE], activations_teacher=chosen[TEACHER],
        activations_without_checkpointing=max(without.values()), activations_with_checkpointing=max(with_ckpt.values()),
        logits=int(logits), zero3_live=int(live), grad_buckets=int(buckets), step_buffer=int(step), runtime=runtime,
        peak=int(states + max(working, step) + runtime), largest_transient=f"{largest} ({transients[largest] / GIB:.2f} GiB)",
    )


def advice(cfg: Config, nodes: int, gpus: int, gib: float, device: str, peak: int) -> str:
    """The first single change (in the order a user would try them) that makes the plan fit."""
    import copy

    tp = cfg.parallel.tensor_parallel
    options = []
    if not cfg.train.activation_checkpointing:
        options.append(("train.activation_checkpointing=true", {"train.activation_checkpointing": True}))
    if cfg.train.micro_batch > 1:
        options.append((f"train.micro_batch={cfg.train.micro_batch // 2} (and train.grad_accum="
                        f"{cfg.train.grad_accum * 2})", {"train.micro_batch": cfg.train.micro_batch // 2,
                                                         "train.grad_accum": cfg.train.grad_accum * 2}))
    if 2 * tp <= gpus and cfg.model.n_heads % (2 * tp) == 0:
        options.append((f"parallel.tensor_parallel={2 * tp}", {"parallel.tensor_parallel": 2 * tp}))
    options.append((f"--nodes {2 * nodes} (ZeRO partitions over twice the devices)", {"nodes": 2 * nodes}))
    for text, change in options:
        trial = copy.deepcopy(cfg)
        trial_nodes = change.pop("nodes", nodes)
        for dotted, value in change.items():
            section, key = dotted.split(".")
            setattr(getattr(trial, section), key, value)
        try:
            trial_peak = plan_run(trial, "", trial_nodes, gpus, gib, device, advise=False).memory.peak
        except ConfigError:
            continue
        if trial_peak <= gib * GIB:
            return f"does not fit: {peak / GIB:.1f} GiB > {gib:g} GiB; set {text}: {trial_peak / GIB:.1f} GiB"
    return f"does not fit: {peak / GIB:.1f} GiB > {gib:g} GiB, and no single change makes it fit: use a larger TP " \
           f"degree with more nodes, or an offloading ds_config (ds_configs/zero3_offload.json)"


SAVE_BYTES_PER_S = 1e9  # a modest shared filesystem; each save logs the rate it got


def format_plan(plan: Plan) -> str:
    m = plan.memory

    def gib(n: float) -> str:
        return f"{n / GIB:.2f} GiB"

    offload = [name for name, on in (("optimizer", plan.offload_optimizer), ("params", plan.offload_params)) if on]
    rows = [
        ("recipe", plan.recipe or "(defaults)"),
        ("grid", f"{plan.world_size} devices = TP {plan.tensor_parallel} x DP {plan.data_parallel}; ZeRO stage "
                 f"{plan.zero_stage}, {plan.precision}, offload {', '.join(offload) or 'none'}"),
        ("model", f"{plan.params_total:,} params, {plan.params_per_device:,} per TP rank; vocab {plan.vocab_size} "
                  f"({plan.vocab_source})"),
        ("language", f"{plan.steps[LANGUAGE]:,} steps x {plan.tokens_per_step[LANGUAGE]:,} tokens = "
                     f"{plan.tokens_total[LANGUAGE]:,} tokens"),
        ("teacher", f"{plan.steps[TEACHER]:,} steps x {plan.propositions_per_step:,} propositions "
                    f"(at most {plan.tokens_per_step[TEACHER]:,} tokens)"),
        ("per device", ""),
        ("  parameters", gib(m.params)),
        ("  gradients", gib(m.grads)),
        ("  optimizer state", gib(m.optimizer) + (" (offloaded to CPU)" if plan.offload_optimizer else "")),
        ("  activations", f"{gib(m.activations)} (language {gib(m.activations_language)}, teacher at full "
                          f"data.teacher_seq_len {gib(m.activations_teacher)}); without checkpointing {gib(m.activations_without_checkpointing)}, "
                          f"with {gib(m.activations_with_checkpointing)}"),
        ("  transient buffers", f"logits {gib(m.logits)}, ZeRO-3 live {gib(m.zero3_live)}, grad buckets "
                                f"{gib(m.grad_buckets)}, optimizer step {gib(m.step_buffer)}; largest: {m.largest_transient}"),
        ("  runtime", gib(m.runtime) + (" (CUDA context, NCCL)" if m.runtime else "")),
        ("  peak", f"{gib(m.peak)} of {gib(plan.gpu_memory)}: " + ("fits" if plan.fits else plan.advice)),
        ("checkpoint", f"{plan.checkpoint_bytes / 1e9:.1f} GB on disk per save, " + (
            f"{plan.keep_checkpoints * plan.checkpoint_bytes / 1e9:.1f} GB for the {plan.keep_checkpoints} kept"
            if plan.keep_checkpoints else "all kept") + f" (train.keep_checkpoints); "
            f"{plan.checkpoint_bytes / SAVE_BYTES_PER_S:.0f} s at 1 GB/s: slurm/train.sh's --signal=B:USR1@SECONDS "
            f"must cover one step and one save"),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}".rstrip() for key, value in rows]
    return "\n".join(lines + [f"note: {note}" for note in plan.notes])
