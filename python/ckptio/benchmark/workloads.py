"""Deterministic benchmark workloads: the same seed gives the same bytes on every run.

* ``llm``: a GPT-2-medium-shaped state dict in fp16 (~710 MB), ``lm_head.weight`` tied to the
  token embedding (``flat`` holds the untied variant, for formats that refuse shared tensors).
* ``small``: 20,000 tensors of 256 B to 64 KiB, mixed fp32/fp16/int64/bool.
* ``ckpt``: a training checkpoint ``{epoch, loss, model_state_dict (~200 MB fp32),
  optimizer_state_dict (AdamW after one step), rng}``.

``quick=True`` shrinks each to a few MB so that tests run in seconds.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["WORKLOADS", "Workload", "build", "gpt2_medium_state_dict"]


@dataclass
class Workload:
    """A benchmark object and what can be measured with it."""

    name: str
    obj: Any  # what torch.save / ckptio.save / pickle write
    flat: Optional[dict[str, torch.Tensor]]  # a flat, unshared dict for tensor-only formats
    description: str
    tied: tuple[str, str] | None = None  # keys whose tensors must share storage after a load

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (each storage once)."""
        seen: dict[Any, int] = {}
        for t in iter_tensors(self.obj):
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return sum(seen.values())


def iter_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples (in order)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
    return out


def gpt2_medium_state_dict(
    dtype: torch.dtype = torch.float16,
    *,
    n_layer: int = 24,
    seed: int = 0,
    d: int = 1024,
    vocab: int = 50257,
    ctx: int = 1024,
) -> OrderedDict[str, torch.Tensor]:
    """A GPT-2-medium-shaped state dict (~710 MB in fp16) with lm_head tied to the embedding,
    named as Hugging Face names it."""
    g = torch.Generator().manual_seed(seed)

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


def llm(quick: bool = False) -> Workload:
    if quick:
        sd = gpt2_medium_state_dict(n_layer=2, d=64, vocab=1000, ctx=64)
    else:
        sd = gpt2_medium_state_dict()
    flat = OrderedDict(sd)
    flat["lm_head.weight"] = sd["lm_head.weight"].clone()  # untied, for tensor-only formats
    return Workload(
        "llm",
        sd,
        flat,
        f"GPT-2-medium-shaped fp16 state dict, {len(sd)} tensors, lm_head tied",
        tied=("transformer.wte.weight", "lm_head.weight"),
    )


_SMALL_DTYPES = (torch.float32, torch.float16, torch.int64, torch.bool)


def small(quick: bool = False) -> Workload:
    n = 500 if quick else 20_000
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(n):
        dtype = _SMALL_DTYPES[i % len(_SMALL_DTYPES)]
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = rng.randint(256, 64 << 10)
        numel = max(1, nbytes // itemsize)
        if dtype is torch.bool:
            t = torch.randint(0, 2, (numel,), generator=g).bool()
        elif dtype is torch.int64:
            t = torch.randint(-(1 << 40), 1 << 40, (numel,), generator=g)
        else:
            t = torch.randn(numel, generator=g).to(dtype)
        sd[f"block.{i // 10}.param{i % 10}"] = t
    return Workload("small", sd, sd, f"{n} tensors of 256 B to 64 KiB, fp32/fp16/int64/bool")


def _mlp(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
    return torch.nn.Sequential(*layers)


def ckpt(quick: bool = False) -> Workload:
    width, depth = (64, 4) if quick else (1024, 48)  # 48 x 1024^2 fp32 = ~200 MB
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = _mlp(width, depth)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj = {
            "epoch": 7,
            "loss": 2.718,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.Random(4).getstate()},
        }
    n = sum(p.numel() for p in model.parameters())
    return Workload("ckpt", obj, None, f"training checkpoint: {n / 1e6:.1f}M fp32 params + AdamW")


WORKLOADS: dict[str, Callable[[bool], Workload]] = {"llm": llm, "small": small, "ckpt": ckpt}


def build(name: str, quick: bool = False) -> Workload:
    """The workload called `name` (one of :data:`WORKLOADS`)."""
    try:
        return WORKLOADS[name](quick)
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
