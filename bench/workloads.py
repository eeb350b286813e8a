"""Deterministic benchmark workloads (shared by the demo and the benchmarks)."""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["gpt2_medium_state_dict", "small_tensors_state_dict"]


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


_SMALL_DTYPES = (torch.float32, torch.float16, torch.int64, torch.bool)


def small_tensors_state_dict(
    n: int = 20_000, *, min_bytes: int = 256, max_bytes: int = 64 << 10, seed: int = 0
) -> OrderedDict[str, torch.Tensor]:
    """`n` tensors of `min_bytes` to `max_bytes` (uniform, ~660 MB for the defaults), cycling
    through fp32, fp16, int64 and bool, 1-D and 2-D, deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_bytes, max_bytes + 1, (n,), generator=g).tolist()
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, nbytes in enumerate(sizes):
        dtype = _SMALL_DTYPES[i % len(_SMALL_DTYPES)]
        numel = max(1, nbytes // dtype.itemsize)
        if dtype.is_floating_point:
            t = torch.randn(numel, generator=g).to(dtype)
        elif dtype is torch.bool:
            t = torch.randint(0, 2, (numel,), generator=g, dtype=torch.uint8).bool()
        else:
            t = torch.randint(-(2**40), 2**40, (numel,), generator=g, dtype=torch.int64)
        if i % 3 == 0 and numel % 4 == 0:
            t = t.view(4, numel // 4)
        sd[f"block{i // 100}.param{i % 100}"] = t
    return sd
