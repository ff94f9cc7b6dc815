"""Language-signal samples of `seq_len + 1` tokens from indexed corpora, through megatron-core's GPT dataset
machinery: documents shuffled and packed per epoch, several corpora blended by weight, all deterministic for
a seed and with the index cached on disk (built by rank 0, read by the others)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from pipeline.data.tokenizer import Tokenizer


@dataclass
class _DatasetTokenizer:
    """What megatron-core's GPT dataset reads of a tokenizer."""

    vocab_size: int
    eod: int
    pad: int
    unique_identifiers: dict = field(default_factory=dict)


def language_dataset(
    prefixes: Sequence[str | Path],
    weights: Sequence[float] | None,
    seq_len: int,
    num_samples: int,
    tokenizer: Tokenizer,
    seed: int,
    cache_dir: str | Path,
) -> Dataset:
    """`num_samples` samples, each a dict with `tokens`, `labels` (tokens shifted by one) and `loss_mask`.
    Needs torch.distributed initialised (rank 0 builds the cached index, the others wait and read it)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=([str(p) for p in prefixes], list(weights) if weights else None),
        split="100,0,0",
        tokenizer=_DatasetTokenizer(
            tokenizer.vocab_size, tokenizer.special.eos, tokenizer.special.pad,
            {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        ),
        path_to_cache=str(cache_dir),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train
