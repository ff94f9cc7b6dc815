"""The `freelm` command. Parses arguments, then calls one function per subcommand; heavy imports
(torch, megatron-core, deepspeed) happen inside those functions so `freelm --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipeline.config import load_config
from pipeline.errors import EXIT_CHECKPOINT_ERROR, EXIT_USER_ERROR, CheckpointError, ConfigError, DataError
from pipeline.model.presets import PRESETS


def model_info(args: argparse.Namespace) -> None:
    overrides = [f"model.preset={args.preset}", f"parallel.tensor_parallel={args.tp}", *args.overrides]
    cfg = load_config(args.config, overrides + ([f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []))
    from pipeline.model.size import measure
    from pipeline.plan import assume_vocab

    assume_vocab(cfg)

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


def plan(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides + ([f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []))
    from pipeline.plan import format_plan, plan_run

    result = plan_run(cfg, str(args.config or ""), args.nodes, args.gpus_per_node, args.gpu_memory)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))


def report_tokenizer(tok, out: str) -> None:
    print(f"tokenizer: {tok.kind}, vocab {tok.vocab_size}, special ids {tok.special} -> {out}")


def tokenizer_train(args: argparse.Namespace) -> None:
    from pipeline.data.readers import expand_inputs, source_kind
    from pipeline.data.tokenizer import train_sentencepiece

    files = expand_inputs(args.input)
    if other := [str(f) for f in files if source_kind(f) != "text"]:
        raise DataError(f"tokenizer train reads plain-text files (one sentence per line), not {', '.join(other[:3])}"
                        f"{' ...' if len(other) > 3 else ''}: give it text files or a sample of your corpus as text")
    report_tokenizer(train_sentencepiece(files, args.out, args.vocab_size, args.sample_lines), args.out)


def tokenizer_import(args: argparse.Namespace) -> None:
    from pipeline.data.tokenizer import HFTokenizer

    tok = HFTokenizer(args.hf)
    tok.save(args.out, imported_from=str(args.hf))
    report_tokenizer(tok, args.out)


def data_corpus(args: argparse.Namespace) -> None:
    from pipeline.data.corpus import build_corpus

    stats = build_corpus(args.input, args.tokenizer, args.out, args.text_field, args.workers, args.on_error)
    print(f"{stats.documents:,} documents, {stats.tokens:,} tokens, {stats.skipped_records:,} records skipped "
          f"in {stats.seconds:.1f}s ({stats.tokens_per_s:,.0f} tokens/s) -> {args.out}.bin/.idx")
    for path, count in stats.skipped.items():
        print(f"  skipped {count:,} in {path}; first: {stats.first_skipped[path]}")


def data_tasks(args: argparse.Namespace) -> None:
    from pipeline.data.propositions import build_propositions

    only = args.only.split(",") if args.only else None
    summary = build_propositions(args.config, args.split, args.tokenizer, args.out, only, args.max_len, args.seed)
    keys = ("examples", "propositions", "positives", "skipped", "truncated")
    print(f"{'task':<16}" + "".join(f"{k:>14}" for k in keys))
    for name, row in summary.items():
        print(f"{name:<16}" + "".join(f"{row[k]:>14,}" for k in keys))
    print(f"-> {args.out}/{args.split}.{{bin,idx,meta.npy,summary.json}}")


def train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from pipeline.train.liveness import RankFailure
    from pipeline.train.trainer import TrainingError, train as run_training

    try:
        run_training(cfg)
    except (TrainingError, RankFailure) as err:  # exit 1: slurm/train.sh restarts from the latest checkpoint
        print(f"freelm: training stopped: {err}", file=sys.stderr)
        sys.exit(1)


def evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pipeline.eval.report import format_table, log_to_mlflow, write_json
    from pipeline.eval.run import evaluate_run

    only = args.only.split(",") if args.only else None
    if args.mlflow and not (Path(args.checkpoint) / "mlflow_run.json").is_file():
        raise ConfigError(f"--mlflow logs to a training run's MLflow run: {args.checkpoint} has no mlflow_run.json")
    run = evaluate_run(args.checkpoint, args.tasks, args.split, only, args.limit, args.heldout, args.batch_tokens,
                       args.seed, args.task_id)
    if not run.main:
        return
    print(format_table(run.tasks))
    print(f"{sum(r.n for r in run.tasks)} examples at {run.examples_per_s:.1f} examples/s; {run.setup}")
    if run.perplexity is not None:
        print(f"perplexity on {args.heldout}: {run.perplexity:.2f}")
    if args.json:
        write_json(args.json, args.checkpoint, args.split, run.tasks, run.perplexity)
    if args.mlflow:
        print(f"logged to MLflow run {log_to_mlflow(args.checkpoint, args.split, run.tasks, run.perplexity)}")


def export_hf(args: argparse.Namespace) -> None:
    from pipeline.hf.export import export_hf as export

    out = export(args.checkpoint, args.out, args.tag, args.dtype, layout=args.format)
    authors = " in the FreeLM authors' layout" if args.format == "freelm" else ""
    print(f"exported {args.checkpoint} -> {out}{authors} (load with transformers.AutoModelForCausalLM.from_pretrained, "
          f"or pipeline.hf.export.from_pretrained for the LM with its teacher head)")


def demo(args: argparse.Namespace) -> None:
    from pipeline.demo import run_demo

    run_demo(args.out, "quick" if args.quick else "full", args.steps, args.processes)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="freelm", description="FreeLM pretraining: language + teacher signals, DeepSpeed ZeRO-3 x megatron TP."
    )
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the environment is used.
    top.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("model-info", help="parameter counts and FLOPs of a model size (built on the meta device)")
    info.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    info.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max positions)")
    info.add_argument("--config", default=None, help="a YAML recipe to start from")
    info.add_argument("--tokenizer", default=None, help="size the vocab from this tokenizer (default: GPT-2's 50257)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.vocab_pad_multiple=0")
    info.set_defaults(func=model_info)

    pln = sub.add_parser("plan", help="memory per GPU, tokens and checkpoint size of a recipe on a cluster, before "
                                      "submitting it (starts nothing, touches no GPU)")
    pln.add_argument("--config", required=True, help="a YAML recipe, e.g. recipes/13b.yaml")
    pln.add_argument("--nodes", type=int, default=1)
    pln.add_argument("--gpus-per-node", type=int, default=8)
    pln.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    pln.add_argument("--tokenizer", default=None, help="size the vocab from this tokenizer (default: the recipe's "
                                                       "data.tokenizer when prepared, else GPT-2's 50257)")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON (keys: see README)")
    pln.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train")
    pln.set_defaults(func=plan)

    tok = sub.add_parser("tokenizer", help="train or import a tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    spm = tok.add_parser("train", help="train a sentencepiece BPE tokenizer with [sep]/[cls]/pad/eos")
    spm.add_argument("--input", nargs="+", required=True, help="text files or globs")
    spm.add_argument("--vocab-size", type=int, default=32000)
    spm.add_argument("--sample-lines", type=int, default=2_000_000, help="lines sampled for training")
    spm.add_argument("--out", required=True, help="output directory")
    spm.set_defaults(func=tokenizer_train)
    imp = tok.add_parser("import", help="a local Hugging Face (GPT-2) tokenizer, with the special tokens added")
    imp.add_argument("--hf", required=True, help="Hugging Face tokenizer directory")
    imp.add_argument("--out", required=True, help="output directory")
    imp.set_defaults(func=tokenizer_import)

    data = sub.add_parser("data", help="prepare the two data streams").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    corpus = data.add_parser("corpus", help="JSONL / Parquet / datasets / text -> megatron indexed dataset (.bin/.idx)")
    corpus.add_argument("--input", nargs="+", required=True,
                        help="files, globs or directories: .jsonl/.json (one document per line, also .gz/.zst), "
                             ".parquet, a datasets save_to_disk directory, or plain text (one document per file); "
                             "directories are walked in sorted order for these (plain text there: *.txt)")
    corpus.add_argument("--tokenizer", required=True, help="tokenizer directory")
    corpus.add_argument("--out", required=True, help="output prefix")
    corpus.add_argument("--text-field", default="text", help="JSON field or Parquet/datasets column of the text")
    corpus.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="a malformed record: stop naming file:line / file:row N (fail), or skip and count it")
    corpus.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    corpus.set_defaults(func=data_corpus)
    tasks = data.add_parser("tasks", help="declared tasks -> tokenized true/false propositions")
    tasks.add_argument("--config", required=True, help="tasks YAML, e.g. recipes/tasks.yaml")
    tasks.add_argument("--split", required=True, help="split name, e.g. train or dev")
    tasks.add_argument("--tokenizer", required=True, help="tokenizer directory")
    tasks.add_argument("--out", required=True, help="output directory")
    tasks.add_argument("--only", default=None, help="comma-separated task names (default: all declaring the split)")
    tasks.add_argument("--max-len", type=int, default=1024, help="truncate inputs (never propositions) to fit")
    tasks.add_argument("--seed", type=int, default=0, help="seed for negative subsampling")
    tasks.set_defaults(func=data_tasks)

    trn = sub.add_parser("train", help="train FreeLM (start with torchrun, the deepspeed launcher or srun)")
    trn.add_argument("--config", default=None, help="a YAML recipe, e.g. recipes/tiny.yaml")
    trn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    trn.set_defaults(func=train)

    ev = sub.add_parser("eval", help="zero-shot proposition scoring, LM-only and majority baselines, perplexity "
                                     "(one process, or start with torchrun, the deepspeed launcher or srun)")
    ev.add_argument("--checkpoint", required=True,
                    help="a training run directory (config.yaml + checkpoints/), or a Hugging Face directory: one "
                         "in the FreeLM authors' layout (num_multi_task_labels, mtc_head) or a freelm export-hf one")
    ev.add_argument("--task-id", type=int, default=None,
                    help="FreeLM authors' layout: the (binary) task whose mtc_head scores propositions (default 0)")
    ev.add_argument("--tasks", required=True, help="tasks YAML, e.g. recipes/tasks.yaml")
    ev.add_argument("--split", default="dev")
    ev.add_argument("--only", default=None, help="comma-separated task names")
    ev.add_argument("--limit", type=int, default=None,
                    help="a random sample of this many examples per task (those with more)")
    ev.add_argument("--seed", type=int, default=0, help="the seed of the --limit sample (default 0)")
    ev.add_argument("--heldout", default=None, help="a text file for perplexity")
    ev.add_argument("--json", default=None, help="also write the results here")
    ev.add_argument("--mlflow", action="store_true", help="also log the results to the training run's MLflow run")
    ev.add_argument("--batch-tokens", type=int, default=None,
                    help="padded tokens per batch (default 32768 on GPU, 2048 on CPU)")
    ev.set_defaults(func=evaluate)

    exp = sub.add_parser("export-hf", help="a training checkpoint -> a Hugging Face transformers directory")
    exp.add_argument("--checkpoint", required=True, help="a training run directory (config.yaml + checkpoints/)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000200 (default: the latest)")
    exp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                     help="weights' precision (default: the one the run trained in)")
    exp.add_argument("--format", choices=("hf", "freelm"), default="hf",
                     help="hf: stock transformers (default); freelm: also the FreeLM authors' layout (GPT-2 block "
                          "only): the teacher head as mtc_head.weight, num_multi_task_labels \"2\" in config.json")
    exp.set_defaults(func=export_hf)

    dem = sub.add_parser("demo", help="end to end on generated data: tokenizer, both streams, ZeRO-3 training on "
                                      "2 processes, zero-shot eval, HF export (a few minutes on CPU)")
    dem.add_argument("--out", default="runs/demo", help="where data, run, log and export go (default runs/demo)")
    dem.add_argument("--quick", action="store_true", help="a smaller world and 30 steps (about a minute)")
    dem.add_argument("--steps", type=int, default=None, help="training steps (default 1500; --quick: 30)")
    dem.add_argument("--processes", type=int, default=2, help="data-parallel processes (default 2)")
    dem.set_defaults(func=demo)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:
        print(f"freelm: config error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except DataError as err:
        print(f"freelm: data error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except CheckpointError as err:
        print(f"freelm: checkpoint error: {err}", file=sys.stderr)
        sys.exit(EXIT_CHECKPOINT_ERROR)


if __name__ == "__main__":
    main()
