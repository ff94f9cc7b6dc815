"""The `freelm` command. Parses arguments, then calls one function per subcommand; heavy imports
(torch, megatron-core, deepspeed) happen inside those functions so `freelm --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.presets import PRESETS


def model_info(args: argparse.Namespace) -> None:
    overrides = [f"model.preset={args.preset}", f"parallel.tensor_parallel={args.tp}", *args.overrides]
    cfg = load_config(args.config, overrides)
    from pipeline.model.size import measure

    size = measure(cfg.model, tp=cfg.parallel.tensor_parallel, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(asdict(size), indent=2))
        return
    padding = size.padded_vocab_size - size.vocab_size
    rows = [
        ("preset", f"{args.preset} ({cfg.model.block} block)"),
        ("shape", f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, "
                  f"ffn {cfg.model.ffn_size}, {cfg.model.max_seq_len} positions"),
        ("vocab", f"{size.vocab_size} padded to {size.padded_vocab_size} (+{padding}) for TP={size.tensor_parallel}"
                  if padding else f"{size.vocab_size} (no padding)"),
        ("total params", f"{size.total_params:,}"),
        (f"params per TP rank (TP={size.tensor_parallel})", f"{size.params_per_tp_rank:,}"),
        ("non-embedding params", f"{size.non_embedding_params:,}"),
        ("teacher head params", f"{size.teacher_head_params:,}"),
        (f"train FLOPs per token (seq {size.seq_len})", f"{size.flops_per_token:.4g}"),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def demo(args: argparse.Namespace) -> None:
    from pipeline.demo import run_demo

    run_demo(steps=args.steps)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="freelm", description="FreeLM pretraining: language + teacher signals, DeepSpeed ZeRO-3 x megatron TP."
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("model-info", help="parameter counts and FLOPs of a model size (built on the meta device)")
    info.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    info.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max positions)")
    info.add_argument("--config", default=None, help="a YAML recipe to start from")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.vocab_pad_multiple=0")
    info.set_defaults(func=model_info)

    dem = sub.add_parser("demo", help="train a tiny FreeLM on both signals for a few steps (one CPU process)")
    dem.add_argument("--steps", type=int, default=40)
    dem.set_defaults(func=demo)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:
        print(f"freelm: config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
