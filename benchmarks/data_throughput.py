"""Data pipeline throughput against its baselines, measured in the same run.

  corpus preparation (read, tokenize in N workers, write .bin/.idx)  vs  the raw tokenizer library encoding the
  same text, already read, in N processes: sentencepiece (a BPE trained here) and Hugging Face `tokenizers` (a
  GPT-2-style byte-level BPE of 46,692 ids trained here, saved as a GPT2TokenizerFast: the paper's path)
  loader tokens/s per rank (language: packed samples; teacher: padded propositions)

Usage: python benchmarks/data_throughput.py [--data ../shared/data] [--vocab 8000] [--copies 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

_encode = None


def _load(kind: str, path: str) -> None:
    global _encode
    if kind == "sentencepiece":
        import sentencepiece as spm

        _encode = spm.SentencePieceProcessor(model_file=path).encode
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as the corpus workers
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
        _encode = lambda text: tokenizer.encode_batch([text], add_special_tokens=False)[0].ids  # noqa: E731


def _count(text: str) -> int:
    return len(_encode(text))


def raw_encode_tokens_per_s(kind: str, path: str, texts: list[str], workers: int) -> float:
    """The ceiling: the tokenizer library encoding already-read text in `workers` processes, nothing else."""
    with mp.get_context("spawn").Pool(workers, _load, (kind, path)) as pool:
        pool.map(_count, texts[:workers])  # warm up the workers
        start = time.perf_counter()
        tokens = sum(pool.map(_count, texts, chunksize=1))
        return tokens / (time.perf_counter() - start)


def train_gpt2_style(files: list[Path], out: Path) -> Path:
    """A byte-level BPE trained towards GPT-2's 50,257 ids, with its eos, saved as a GPT2TokenizerFast directory.
    The Gutenberg books hold too little text for all of them: it stops at 46,689 (46,692 with pad, [sep], [cls])."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(f) for f in files], vocab_size=50257, special_tokens=["<|endoftext|>"], show_progress=False)
    eos = "<|endoftext|>"
    GPT2TokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos).save_pretrained(str(out))
    return out


def pieces(files: list[Path], size: int = 1 << 20) -> list[str]:
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        out += [text[i:i + size] for i in range(0, len(text), size)]
    return out


def copies(files: list[Path], out: Path, count: int) -> list[Path]:
    out.mkdir()
    made = []
    for k in range(count):
        for f in files:
            made.append(out / f"{k}-{f.name}")
            made[-1].write_bytes(f.read_bytes())
    return made


def utf8(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
        return True
    except UnicodeDecodeError:
        return False


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
    parser.add_argument("--copies", type=int, default=3,
                        help="the books are tokenized this many times over (as distinct files), so that one-time "
                             "costs (starting the workers) weigh as little as in a real corpus (default 3)")
    args = parser.parse_args()
    data = Path(args.data)
    # The UTF-8 books (the byte-level BPE trainer refuses the rest).
    files = [f for f in sorted((data / "lm" / "gutenberg_nltk").glob("*.txt")) if utf8(f)]
    tasks_yaml = Path(__file__).resolve().parents[1] / "recipes" / "tasks.yaml"
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")

    from pipeline.data.corpus import build_corpus
    from pipeline.data.lm_dataset import language_dataset
    from pipeline.data.loaders import language_loader, teacher_loader
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import HFTokenizer, SentencePieceTokenizer, train_sentencepiece
    from pipeline.parallel.distributed import init_parallel

    init_parallel(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_sentencepiece(files, tmp / "tok", args.vocab)
        gpt2 = HFTokenizer(train_gpt2_style(files, tmp / "gpt2"))
        gpt2.save(tmp / "tok-gpt2")
        tokenizers = {"sentencepiece": (tmp / "tok", str(tmp / "tok" / SentencePieceTokenizer.MODEL_FILE)),
                      "huggingface": (tmp / "tok-gpt2", str(tmp / "tok-gpt2" / "tokenizer.json"))}
        corpus = copies(files, tmp / "books", args.copies)
        texts = pieces(corpus)
        mb = sum(f.stat().st_size for f in corpus) / 2**20
        print(f"corpus: {len(files)} Gutenberg books x {args.copies} copies, {mb:.1f} MiB; sentencepiece BPE vocab "
              f"{tok.vocab_size}, GPT-2-style byte-level BPE vocab {gpt2.vocab_size}")
        print(f"{'tokenizer':>14} {'workers':>8} {'raw encode tok/s':>18} {'corpus prep tok/s':>18} {'ratio':>7}")
        for kind, (tok_dir, raw_file) in tokenizers.items():
            for workers in (1, 2):
                raw = raw_encode_tokens_per_s(kind, raw_file, texts, workers)
                stats = build_corpus([str(f) for f in corpus], tok_dir, tmp / f"{kind}{workers}", workers=workers)
                print(f"{kind:>14} {workers:>8} {raw:>18,.0f} {stats.tokens_per_s:>18,.0f} "
                      f"{stats.tokens_per_s / raw:>7.2f}")

        seq, micro = 1024, 8
        lm = language_dataset([tmp / "sentencepiece2"], None, seq, 2000, tok, 0, tmp / "cache")
        lang = loader_tokens_per_s(language_loader(lm, micro, 0, 1), 100, lambda b: b["tokens"].numel())
        build_propositions(tasks_yaml, "train", tmp / "tok", tmp / "tasks", only=["sst2"])
        teacher = teacher_loader(str(tmp / "tasks" / "train"), seq, tok.special.pad, 32, 0, 1, seed=0)
        teach = loader_tokens_per_s(teacher, 200, lambda b: int(b["lengths"].sum()))
        print(f"language loader (seq {seq}, micro-batch {micro}): {lang:,.0f} tokens/s per rank")
        print(f"teacher loader (SST-2 train, micro-batch 32):   {teach:,.0f} real tokens/s per rank")


if __name__ == "__main__":
    main()
