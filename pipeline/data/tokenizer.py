"""Tokenizers with the recipe's special tokens (pad, eos, `[sep]`, `[cls]`) as real single ids.

Two kinds behind one interface: a sentencepiece BPE model trained by `freelm tokenizer train`, or a local
Hugging Face GPT-2 tokenizer directory (the paper continued from GPT-2) with the special tokens added.
A tokenizer directory holds the model files plus `freelm_tokenizer.json`, which records what it is.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

SEP, CLS = "[sep]", "[cls]"
META_FILE = "freelm_tokenizer.json"


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    sep: int
    cls: int


class Tokenizer:
    """Text <-> ids. `[sep]` and `[cls]` written in text encode to their single ids; no id is added
    implicitly (callers append `eos` per document)."""

    kind: str
    special: SpecialIds

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _write_meta(self, out: Path, **extra) -> None:
        meta = dict(kind=self.kind, vocab_size=self.vocab_size, special=asdict(self.special), **extra)
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.special = SpecialIds(
            pad=self.sp.pad_id(), eos=self.sp.eos_id(), sep=self.sp.piece_to_id(SEP), cls=self.sp.piece_to_id(CLS)
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, out_dir: str | Path, **extra) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / self.MODEL_FILE).write_bytes(self.proto)
        self._write_meta(out, **extra)


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (e.g. GPT-2's), with pad, `[sep]` and `[cls]` added as
    special tokens when missing (a pad that is the eos token gets a pad of its own); eos is the tokenizer's own
    (`<|endoftext|>` for GPT-2). A fast tokenizer encodes and decodes through its `tokenizers` backend."""

    kind = "huggingface"

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tok.eos_token_id is None:
            raise ValueError(f"{path}: the Hugging Face tokenizer has no eos token")
        missing = [t for t in (SEP, CLS) if t not in self.tok.get_vocab()]
        # A pad equal to eos (common in LLaMA tokenizers) would have every eos masked out of the LM loss.
        own_pad = self.tok.pad_token and self.tok.pad_token_id != self.tok.eos_token_id
        self.tok.add_special_tokens(
            {"additional_special_tokens": missing} | ({} if own_pad else {"pad_token": "<|pad|>"})
        )
        self.special = SpecialIds(
            pad=self.tok.pad_token_id, eos=self.tok.eos_token_id,
            sep=self.tok.convert_tokens_to_ids(SEP), cls=self.tok.convert_tokens_to_ids(CLS),
        )
        self.backend = self.tok.backend_tokenizer if self.tok.is_fast else None

    @classmethod
    def imported(cls, path: Path, special: SpecialIds) -> HFTokenizer:
        """A directory `freelm tokenizer import` wrote: its tokenizer.json already holds the added tokens, so the
        `tokenizers` library alone reads it, without importing transformers (2.4 s less per process, e.g. per
        corpus worker)."""
        from tokenizers import Tokenizer as Backend

        self = cls.__new__(cls)
        self.path, self.tok, self.special = path, None, special
        self.backend = Backend.from_file(str(path / "tokenizer.json"))
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.tok) if self.tok is not None else self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.backend is None:
            return self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        if self.backend is None:
            return self.tok.decode(list(ids))
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir: str | Path, **extra) -> None:
        out = Path(out_dir)
        tok = self.tok if self.tok is not None else HFTokenizer(self.path).tok
        tok.save_pretrained(str(out))
        self._write_meta(out, **extra)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A directory written by `freelm tokenizer train`/`import`, or a plain Hugging Face tokenizer directory."""
    path = Path(path)
    meta_path = path / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["kind"] == SentencePieceTokenizer.kind:
            return SentencePieceTokenizer((path / SentencePieceTokenizer.MODEL_FILE).read_bytes())
        if (path / "tokenizer.json").exists():
            return HFTokenizer.imported(path, SpecialIds(**meta["special"]))
        return HFTokenizer(path)
    if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
        return HFTokenizer(path)
    raise FileNotFoundError(f"{path}: no tokenizer here (expected {META_FILE} or a Hugging Face tokenizer)")


def tokenizer_vocab_size(path: str | Path) -> int:
    """The number of ids of the tokenizer in `path`, from its `freelm_tokenizer.json` when it has one
    (no tokenizer library imported), else by loading it."""
    meta_path = Path(path) / META_FILE
    if meta_path.exists():
        return int(json.loads(meta_path.read_text())["vocab_size"])
    return load_tokenizer(path).vocab_size


def train_sentencepiece(
    files: Sequence[str | Path], out_dir: str | Path, vocab_size: int, sample_lines: int = 2_000_000, seed: int = 0
) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE model that round-trips text exactly: identity normalisation, whitespace
    kept as is, newline a piece of its own, digits split. Ids: 0 unk, 1 eos, 2 pad, 3 `[sep]`, 4 `[cls]`."""
    import sentencepiece as spm

    start = time.perf_counter()
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files], model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True,
        unk_id=0, eos_id=1, pad_id=2, bos_id=-1, user_defined_symbols=[SEP, CLS, "\n"],
        input_sentence_size=sample_lines, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2,
    )
    tok = SentencePieceTokenizer(proto.getvalue())
    tok.save(out_dir, trained_on=[str(f) for f in files], train_seconds=round(time.perf_counter() - start, 2))
    return tok
