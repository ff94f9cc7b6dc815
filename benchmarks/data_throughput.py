"""Data pipeline throughput against its baselines, measured in the same run.

  corpus preparation (read, tokenize in N workers, write .bin/.idx)  vs  raw sentencepiece encode in N processes
  loader tokens/s per rank (language: packed samples; teacher: padded propositions)

Usage: python benchmarks/data_throughput.py [--data ../shared/data] [--vocab 8000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

_sp = None


def _load(model_file: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model_file)


def _count(text: str) -> int:
    return len(_sp.encode(text))


def raw_encode_tokens_per_s(model_file: str, texts: list[str], workers: int) -> float:
    """The ceiling: sentencepiece encoding already-read text in `workers` processes, nothing else."""
    with mp.get_context("spawn").Pool(workers, _load, (model_file,)) as pool:
        pool.map(_count, texts[:workers])  # warm up the workers
        start = time.perf_counter()
        tokens = sum(pool.map(_count, texts, chunksize=1))
        return tokens / (time.perf_counter() - start)


def pieces(files: list[Path], size: int = 1 << 20) -> list[str]:
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        out += [text[i:i + size] for i in range(0, len(text), size)]
    return out


def loader_tokens_per_s(loader, batches: int, count) -> float:
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    tokens = sum(count(next(it)) for _ in range(batches))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()
    data = Path(args.data)
    files = sorted((data / "lm" / "gutenberg_nltk").glob("*.txt"))
    tasks_yaml = Path(__file__).resolve().parents[1] / "recipes" / "tasks.yaml"
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")

    from pipeline.data.corpus import build_corpus
    from pipeline.data.lm_dataset import language_dataset
    from pipeline.data.loaders import language_loader, teacher_loader
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from pipeline.parallel.distributed import init_parallel

    init_parallel(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_sentencepiece(files, tmp / "tok", args.vocab)
        model_file = str(tmp / "tok" / SentencePieceTokenizer.MODEL_FILE)
        texts = pieces(files)
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"corpus: {len(files)} Gutenberg books, {mb:.1f} MiB; sentencepiece BPE vocab {tok.vocab_size}")
        print(f"{'workers':>8} {'raw encode tok/s':>18} {'corpus prep tok/s':>18} {'ratio':>7}")
        for workers in (1, 2):
            raw = raw_encode_tokens_per_s(model_file, texts, workers)
            stats = build_corpus([str(f) for f in files], tmp / "tok", tmp / f"corpus{workers}", workers=workers)
            print(f"{workers:>8} {raw:>18,.0f} {stats.tokens_per_s:>18,.0f} {stats.tokens_per_s / raw:>7.2f}")

        seq, micro = 1024, 8
        lm = language_dataset([tmp / "corpus2"], None, seq, 2000, tok, 0, tmp / "cache")
        lang = loader_tokens_per_s(language_loader(lm, micro, 0, 1), 100, lambda b: b["tokens"].numel())
        build_propositions(tasks_yaml, "train", tmp / "tok", tmp / "tasks", only=["sst2"])
        teacher = teacher_loader(str(tmp / "tasks" / "train"), seq, tok.special.pad, 32, 0, 1, seed=0)
        teach = loader_tokens_per_s(teacher, 200, lambda b: int(b["lengths"].sum()))
        print(f"language loader (seq {seq}, micro-batch {micro}): {lang:,.0f} tokens/s per rank")
        print(f"teacher loader (SST-2 train, micro-batch 32):   {teach:,.0f} real tokens/s per rank")


if __name__ == "__main__":
    main()
