"""Deterministic benchmark workloads (shared by the demo and the benchmarks)."""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["gpt2_medium_state_dict"]


def gpt2_medium_state_dict(
    dtype: torch.dtype = torch.float16, *, n_layer: int = 24, seed: int = 0
) -> OrderedDict[str, torch.Tensor]:
    """A GPT-2-medium-shaped state dict (~710 MB in fp16) with lm_head tied to the embedding,
    named as Hugging Face names it."""
    g = torch.Generator().manual_seed(seed)
    d, vocab, ctx = 1024, 50257, 1024

    def t(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)

    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["transformer.wte.weight"] = t(vocab, d)
    sd["transformer.wpe.weight"] = t(ctx, d)
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = t(d), t(d)
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = t(d, 3 * d), t(3 * d)
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = t(d, d), t(d)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = t(d), t(d)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = t(d, 4 * d), t(4 * d)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = t(4 * d, d), t(d)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = t(d), t(d)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, as in GPT-2
    return sd
