"""TP=2 across two gloo processes equals TP=1 with the same full weights.

Tolerance (fp32): rtol 1e-4, atol 1e-5 on logits, both losses and every gradient; the only differences are
summation order in the all-reduces.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed import run_ranks
from pipeline.model.config import ModelConfig

TOL = dict(rtol=1e-4, atol=1e-5)


def make_inputs(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, vocab, (4, 17), generator=g)
    lengths = torch.tensor([16, 9, 5, 12])
    teacher = torch.randint(0, vocab, (4, 16), generator=g)
    teacher[torch.arange(16)[None, :] >= lengths[:, None]] = 0
    return dict(tokens=seqs[:, :-1], targets=seqs[:, 1:], teacher_tokens=teacher, lengths=lengths,
                labels=torch.tensor([1, 0, 0, 1]))


def run_signals(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    """Logits, both losses and per-signal gradients (this rank's shards)."""
    result: dict = {"logits": model(inputs["tokens"], signal="language").logits.detach()}
    model.zero_grad()
    lang = model(inputs["tokens"], signal="language", targets=inputs["targets"])
    lang.loss.backward()
    result["language_loss"] = lang.loss.detach()
    result["language_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    teach = model(inputs["teacher_tokens"], signal="teacher", lengths=inputs["lengths"], labels=inputs["labels"])
    teach.loss.backward()
    result["teacher_loss"] = teach.loss.detach()
    result["teacher_logits"] = teach.logits.detach()
    result["teacher_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result


def tp2_rank(ref_path: str) -> None:
    from megatron.core import parallel_state

    from pipeline.model.freelm import FreeLM
    from pipeline.parallel.distributed import destroy_parallel, init_parallel
    from pipeline.parallel.tensor_parallel import gather, load_full_state_dict

    init_parallel(tensor_parallel=2)
    ref = torch.load(ref_path)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(1234)  # a different init: parity must come from the loaded weights
    model = FreeLM(ModelConfig(**ref["cfg"]))
    load_full_state_dict(model, ref["weights"], group)
    got = run_signals(model, ref["inputs"])
    params = dict(model.named_parameters())

    vocab_shard = ref["logits"].shape[-1] // 2
    torch.testing.assert_close(got["logits"], ref["logits"][..., rank * vocab_shard:(rank + 1) * vocab_shard], **TOL)
    torch.testing.assert_close(got["language_loss"], ref["language_loss"], **TOL)
    torch.testing.assert_close(got["teacher_loss"], ref["teacher_loss"], **TOL)
    torch.testing.assert_close(got["teacher_logits"], ref["teacher_logits"], **TOL)
    for signal in ("language_grads", "teacher_grads"):
        assert got[signal].keys() == ref[signal].keys(), signal
        for name, grad in got[signal].items():
            torch.testing.assert_close(gather(grad, params[name], group), ref[signal][name], **TOL,
                                       msg=lambda m, n=name, s=signal: f"{s} {n}: {m}")
    destroy_parallel()


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_tp2_matches_tp1(block, parallel_1, tmp_path):
    from pipeline.model.freelm import FreeLM

    # vocab 1000 pads to 1024 at TP=1 and TP=2 alike (multiple of 128 * tp).
    cfg = ModelConfig(block=block, n_layers=2, d_model=64, n_heads=4, vocab_size=1000, max_seq_len=32)
    torch.manual_seed(0)
    model = FreeLM(cfg)
    inputs = make_inputs(cfg.vocab_size)
    ref = run_signals(model, inputs)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    assert ref["language_grads"]["embed.weight"].abs().sum() > 0
    torch.save(dict(cfg=dataclasses.asdict(cfg), weights=weights, inputs=inputs, **ref), tmp_path / "ref.pt")
    run_ranks(tp2_rank, 2, str(tmp_path / "ref.pt"))
