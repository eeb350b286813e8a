"""ckptio.load_into: checkpoints read in place into existing tensors, with torch as the oracle
(``load_state_dict`` of ``torch.load``'s result)."""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ckptio

from conftest import V3_DTYPE, assert_same, make_model, same_values, trained_optimizer

WRITERS: dict[str, Callable[[Any, Any], None]] = {
    "ckptio": ckptio.save,
    "torch": torch.save,
}


def _zeroed(obj: Any) -> Any:
    """A structure like `obj` whose tensors are fresh, zeroed and distinct."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj, memory_format=torch.contiguous_format)
    if isinstance(obj, dict):
        return type(obj)((k, _zeroed(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_zeroed(v) for v in obj)
    return obj


def _ptrs(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in sd.items()}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_module_matches_load_state_dict(tmp_path: Path, writer: str) -> None:
    src = make_model(seed=3)
    path = tmp_path / "m.pt"
    WRITERS[writer](src.state_dict(), path)
    oracle = make_model(seed=4)
    oracle.load_state_dict(torch.load(path))
    model = make_model(seed=4)
    before = _ptrs(model.state_dict())
    result = ckptio.load_into(model, path)
    assert result == ckptio.IncompatibleKeys([], [])
    assert_same(model.state_dict(), oracle.state_dict())
    assert _ptrs(model.state_dict()) == before  # in place: no tensor was replaced
    assert model.lm_head.weight is model.tok_emb.weight  # tie kept
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8]
)
def test_state_dict_dtypes(tmp_path: Path, writer: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        f"t{i}": (torch.randn(n, generator=g) * 50).to(dtype)
        for i, n in enumerate([1, 7, 4096, 100_003])
    }
    sd["empty"] = torch.empty(0, 3, dtype=dtype)
    sd["scalar"] = torch.tensor(3, dtype=dtype)
    path = tmp_path / "sd.pt"
    WRITERS[writer](sd, path)
    target = _zeroed(sd)
    before = _ptrs(target)
    ckptio.load_into(target, path)
    assert_same(target, torch.load(path))
    assert _ptrs(target) == before


@pytest.mark.parametrize("writer", list(WRITERS))
def test_views_shared_storage_and_strides(tmp_path: Path, writer: str) -> None:
    base = torch.arange(600, dtype=torch.float32).reshape(20, 30)
    sd = {
        "base": base,
        "tied": base,  # the same tensor twice
        "rows": base[5:9],  # a contiguous view at an offset
        "transposed": base.t(),  # a strided view: the file's bytes are not in its order
        "column": base[:, 7],
        "other": torch.linspace(0, 1, 11),
    }
    path = tmp_path / "views.pt"
    WRITERS[writer](sd, path)
    target = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    target["noncontig"] = torch.zeros(30, 20).t()  # a non-contiguous destination
    sd_file = dict(sd, noncontig=base)
    WRITERS[writer](sd_file, path)
    ckptio.load_into(target, path)
    oracle = torch.load(path)
    for k in target:
        assert torch.equal(target[k], oracle[k]), k
    assert target["noncontig"].stride() == (1, 20)


def test_training_checkpoint_nested(tmp_path: Path) -> None:
    model, opt = trained_optimizer("adamw")
    ckpt = {
        "epoch": 3,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
    }
    path = tmp_path / "ckpt.pt"
    ckptio.save(ckpt, path)
    model2 = make_model(seed=5)
    target = {
        "epoch": 0,
        "model": model2.state_dict(),
        "optimizer": _zeroed(opt.state_dict()),
        "rng": torch.zeros_like(torch.get_rng_state()),
    }
    assert ckptio.load_into(target, path) == ([], [])
    oracle = torch.load(path)
    for key in ("model", "optimizer", "rng"):
        assert_same(target[key], oracle[key], key)
    assert target["epoch"] == 0  # only tensors are loaded


def test_file_objects(tmp_path: Path) -> None:
    sd = make_model().state_dict()
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    for opener in (lambda: open(path, "rb"), lambda: io.BytesIO(path.read_bytes())):
        target = _zeroed(sd)
        with opener() as fh:
            ckptio.load_into(target, fh)
        assert_same(dict(target), dict(sd))


def test_strict_errors_name_every_problem(tmp_path: Path) -> None:
    sd = collections.OrderedDict(a=torch.ones(3), b=torch.ones(2, 2), c=torch.ones(4))
    path = tmp_path / "sd.pt"
    ckptio.save(sd, path)
    target = {"a": torch.zeros(3), "b": torch.zeros(4), "x": torch.zeros(1)}
    with pytest.raises(RuntimeError) as err:
        ckptio.load_into(target, path)
    msg = str(err.value)
    assert "Unexpected key(s) in the file: 'c'" in msg
    assert "Missing key(s) in the file: 'x'" in msg
    assert "mismatch for 'b'" in msg and "(2, 2)" in msg
    assert torch.equal(target["a"], torch.zeros(3))  # nothing is written on error


def test_dtype_mismatch_raises(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    ckptio.save({"a": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match=r"mismatch for 'a': the file has torch.float32"):
        ckptio.load_into({"a": torch.zeros(3, dtype=torch.float64)}, path)


def test_non_strict_reports_keys(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    ckptio.save({"a": torch.ones(3), "c": torch.ones(1)}, path)
    target = {"a": torch.zeros(3), "x": torch.zeros(1)}
    result = ckptio.load_into(target, path, strict=False)
    assert result.missing_keys == ["x"] and result.unexpected_keys == ["c"]
    assert torch.equal(target["a"], torch.ones(3))
    with pytest.raises(RuntimeError, match="mismatch"):  # shapes are checked even so
        ckptio.load_into({"a": torch.zeros(4)}, path, strict=False)


def test_refuses_what_weights_only_refuses(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"a": torch.ones(2), "obj": Path("x")}, path)
    with pytest.raises(ckptio.UnsafeGlobalError):
        ckptio.load_into({"a": torch.zeros(2)}, path)


def test_not_a_zip_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ckptio.CheckpointError, match="zip checkpoints"):
        ckptio.load_into({"a": torch.zeros(2)}, path)
    with pytest.raises(TypeError, match="state dict"):
        ckptio.load_into(torch.zeros(2), path)


def test_read_items_copies_into_strided_destination(tmp_path: Path) -> None:
    from ckptio._load_into import ReadItem, read_items

    data = torch.arange(12, dtype=torch.int32)
    path = tmp_path / "raw.bin"
    path.write_bytes(data.numpy().tobytes())
    dest = torch.zeros(4, 3, dtype=torch.int32).t()  # non-contiguous: read via a temporary
    with ckptio._core.io.File.open(str(path), ckptio._core.io.FileMode.READ) as f:
        read_items(f, [ReadItem(0, 48, dest)])
    assert torch.equal(dest, data.reshape(3, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_destination(tmp_path: Path) -> None:  # pragma: no cover - no GPU in CI
    path = tmp_path / "sd.pt"
    sd = {"a": torch.randn(1000)}
    ckptio.save(sd, path)
    target = {"a": torch.zeros(1000, device="cuda")}
    ckptio.load_into(target, path)
    assert torch.equal(target["a"].cpu(), sd["a"])


# -- how the file is parsed: TensorSpecs, or meta placeholders when tensors are needed -------
def _flatten(obj: Any, leaf: type) -> dict[Any, Any]:
    from ckptio._load_into import _flatten as flatten

    return flatten(obj, leaf)


def _spy_placeholders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from ckptio import _load_into

    calls: list[int] = []
    original = _load_into.unpickle_placeholders

    def spy(archive: Any) -> Any:
        calls.append(1)
        return original(archive)

    monkeypatch.setattr(_load_into, "unpickle_placeholders", spy)
    return calls


@pytest.mark.parametrize("writer", list(WRITERS))
def test_plain_checkpoints_are_parsed_without_tensor_objects(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = trained_optimizer("adamw")
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7}
    ckpt["model"]["param"] = torch.nn.Parameter(torch.arange(3.0))  # _rebuild_parameter
    ckpt["model"]["v3"] = torch.arange(4).to(V3_DTYPE)  # _rebuild_tensor_v3
    path = tmp_path / "ckpt.pt"
    WRITERS[writer](ckpt, path)
    calls = _spy_placeholders(monkeypatch)
    target = _zeroed(ckpt)
    assert ckptio.load_into(target, path) == ([], [])
    assert calls == []
    oracle = _flatten(torch.load(path), torch.Tensor)
    got = _flatten(target, torch.Tensor)
    assert list(got) == list(oracle)
    for k, v in oracle.items():  # (values: the target's tensors keep their own type)
        assert same_values(got[k], v), k


def test_files_that_need_tensor_objects_are_parsed_over_placeholders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse tensor (rebuilt from tensors) sends the parse to meta placeholders; dense
    tensors still load, and the sparse one is named if the target asks for it."""
    sd = {"w": torch.arange(6.0), "sparse": torch.eye(3).to_sparse()}
    path = tmp_path / "sparse.pt"
    torch.save(sd, path)
    calls = _spy_placeholders(monkeypatch)
    target = {"w": torch.zeros(6)}
    assert ckptio.load_into(target, path, strict=False) == ([], ["sparse"])
    assert torch.equal(target["w"], sd["w"])
    assert calls == [1]
    with pytest.raises(RuntimeError, match="'sparse': only dense"):
        ckptio.load_into({"w": torch.zeros(6), "sparse": torch.zeros(3, 3)}, path)


def test_tensor_saved_without_storage_is_named(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"m": torch.empty(3, device="meta"), "e": torch.empty(0, device="meta")}, path)
    target = {"m": torch.zeros(3), "e": torch.zeros(0)}
    with pytest.raises(RuntimeError, match="'m': the file's tensor has no storage record"):
        ckptio.load_into(target, path)
    assert ckptio.load_into({"e": torch.zeros(0)}, path, strict=False) == ([], ["m"])


@pytest.mark.parametrize("seed", range(5))
def test_contiguity_is_torchs(seed: int) -> None:
    from ckptio._load_into import _is_contiguous

    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        ndim = int(torch.randint(0, 4, (1,), generator=g))
        size = tuple(int(x) for x in torch.randint(1, 4, (ndim,), generator=g))
        stride = tuple(int(x) for x in torch.randint(0, 13, (ndim,), generator=g))
        if torch.rand(1, generator=g) < 0.5:  # often the row-major strides themselves
            stride = torch.empty(size).stride()
        t = torch.empty_strided(size, stride)
        assert _is_contiguous(size, stride) == t.is_contiguous(), (size, stride)
