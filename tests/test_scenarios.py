"""The four save/load recipes every PyTorch user knows (the PyTorch "Saving and Loading
Models" tutorial), each done with ckptio and checked against stock torch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import ckptio

from conftest import (
    TinyGPT,
    assert_same,
    assert_same_sharing,
    loss_of,
    make_model,
    model_input,
    train,
)


class WholeModel(TinyGPT):
    """Defined at module level so that pickling the whole module works (scenario 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_scale = nn.Parameter(torch.ones(1))
        self.name = "whole-model"

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx) * self.head_scale


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    x, _ = model_input(seed=99)
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _params_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


SAVERS: dict[str, Callable[[Any, Path], Any]] = {
    "path": lambda obj, p: ckptio.save(obj, p),
    "buffer": lambda obj, p: p.write_bytes(_to_bytes(obj)),
}


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    ckptio.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------- (1) state_dict into a fresh model
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("saver", list(SAVERS))
def test_state_dict_into_fresh_model(tmp_path: Path, saver: str, mmap: bool) -> None:
    model = make_model(seed=0)
    path = tmp_path / "model.pt"
    SAVERS[saver](model.state_dict(), path)

    fresh = make_model(seed=123)
    result = fresh.load_state_dict(ckptio.load(path, mmap=mmap))
    assert not result.missing_keys and not result.unexpected_keys
    _same_outputs(model, fresh)
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # tying survives load_state_dict

    oracle = make_model(seed=123)
    oracle.load_state_dict(torch.load(path, mmap=mmap))
    _same_outputs(oracle, fresh)


def test_state_dict_assign_keeps_tying(tmp_path: Path) -> None:
    """load_state_dict(assign=True) with an mmap load: the loaded tied tensors are one
    storage, so the tied parameters still share memory (as with torch.load)."""
    model = make_model()
    path = tmp_path / "model.pt"
    ckptio.save(model.state_dict(), path)
    sd = ckptio.load(path, mmap=True)
    assert sd["tok_emb.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    with torch.device("meta"):
        fresh = TinyGPT()
    fresh.load_state_dict(sd, assign=True)
    _same_outputs(model, fresh)


# --------------------------------------------------------- (2) the entire nn.Module pickled
@pytest.mark.parametrize("saver", list(SAVERS))
def test_entire_model(tmp_path: Path, saver: str) -> None:
    model = make_model(seed=4, cls=WholeModel)
    path = tmp_path / "whole.pt"
    SAVERS[saver](model, path)

    for loaded in (
        ckptio.load(path, weights_only=False),
        ckptio.load(path, weights_only=False, mmap=True),
        torch.load(path, weights_only=False),
    ):
        assert type(loaded) is WholeModel
        assert loaded.name == "whole-model"
        assert loaded.lm_head.weight is loaded.tok_emb.weight
        _same_outputs(model, loaded)
        assert_same(model.state_dict(), loaded.state_dict())


def test_entire_model_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    ckptio.save(make_model(cls=WholeModel), path)
    with pytest.raises(ckptio.UnsafeGlobalError, match="WholeModel"):
        ckptio.load(path)


def test_torch_saved_entire_model(tmp_path: Path) -> None:
    model = make_model(seed=4, cls=WholeModel)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    loaded = ckptio.load(path, weights_only=False)
    assert type(loaded) is WholeModel
    _same_outputs(model, loaded)


# ------------------------------------------------------- (3) general checkpoint and resume
def _make_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)


def _resume(path: Path, load: Callable[..., Any], **kw: Any) -> tuple[nn.Module, Any, dict]:
    ckpt = load(path, **kw)
    model = make_model(seed=77)
    model.load_state_dict(ckpt["model_state_dict"])
    opt = _make_adamw(model)
    opt.load_state_dict(ckpt["optimizer_state_dict"])
    model.train()
    return model, opt, ckpt


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_general_checkpoint_resume(tmp_path: Path, mmap: bool) -> None:
    model = make_model(seed=0)
    opt = _make_adamw(model)
    loss = train(model, opt, steps=3)
    path = tmp_path / "ckpt.pt"
    ckpt = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": loss,
    }
    ckptio.save(ckpt, path)

    resumed, resumed_opt, loaded = _resume(path, ckptio.load, mmap=mmap)
    oracle, oracle_opt, _ = _resume(path, torch.load, mmap=mmap)
    assert loaded["epoch"] == 3 and loaded["loss"] == loss
    assert_same(opt.state_dict(), resumed_opt.state_dict())
    _params_equal(model, resumed)

    # One more step everywhere: bitwise identical next-step loss and parameters.
    next_loss = train(model, opt, steps=1, seed=10)
    resumed_loss = train(resumed, resumed_opt, steps=1, seed=10)
    oracle_loss = train(oracle, oracle_opt, steps=1, seed=10)
    assert next_loss == resumed_loss == oracle_loss
    _params_equal(model, resumed)
    _params_equal(oracle, resumed)
    assert_same(opt.state_dict(), resumed_opt.state_dict())


def test_checkpoint_saved_by_torch_resumes_with_ckptio(tmp_path: Path) -> None:
    model = make_model(seed=0)
    opt = _make_adamw(model)
    train(model, opt, steps=2)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "epoch": 2,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
        },
        path,
    )
    resumed, resumed_opt, _ = _resume(path, ckptio.load)
    assert train(model, opt, 1, seed=5) == train(resumed, resumed_opt, 1, seed=5)
    _params_equal(model, resumed)


# ------------------------------------------------- (4) several models and optimizers at once
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_several_models_in_one_file(tmp_path: Path, mmap: bool) -> None:
    gen = make_model(seed=1)
    disc = make_model(seed=2, cls=Discriminator)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.SGD(disc.parameters(), lr=1e-2, momentum=0.9)
    train(gen, opt_g, steps=1)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    opt_d.zero_grad()
    disc(x).pow(2).mean().backward()
    opt_d.step()

    everything = {
        "modelA_state_dict": gen.state_dict(),
        "modelB_state_dict": disc.state_dict(),
        "optimizerA_state_dict": opt_g.state_dict(),
        "optimizerB_state_dict": opt_d.state_dict(),
    }
    path = tmp_path / "all.pt"
    ckptio.save(everything, path)

    loaded = ckptio.load(path, mmap=mmap)
    assert_same(everything, loaded)
    assert_same_sharing(everything, loaded)
    assert_same(torch.load(path, mmap=mmap), loaded)

    gen2, disc2 = make_model(seed=9), make_model(seed=9, cls=Discriminator)
    gen2.load_state_dict(loaded["modelA_state_dict"])
    disc2.load_state_dict(loaded["modelB_state_dict"])
    opt_g2 = torch.optim.Adam(gen2.parameters(), lr=1e-3)
    opt_g2.load_state_dict(loaded["optimizerA_state_dict"])
    opt_d2 = torch.optim.SGD(disc2.parameters(), lr=1e-2, momentum=0.9)
    opt_d2.load_state_dict(loaded["optimizerB_state_dict"])
    _same_outputs(gen, gen2)
    disc.eval()
    disc2.eval()
    with torch.no_grad():
        assert torch.equal(disc(x), disc2(x))
    gen.train()
    gen2.train()
    assert train(gen, opt_g, 1, seed=3) == train(gen2, opt_g2, 1, seed=3)
    _params_equal(gen, gen2)
    with torch.no_grad():
        assert float(loss_of(gen, model_input(4))) == float(loss_of(gen2, model_input(4)))
