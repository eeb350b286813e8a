"""Model directories on the read side: load, open, load_into and per-rank slices over the
shards of a directory, checked against huggingface_hub (the oracle that writes and reads
transformers' layout) and against hand-made broken indexes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _reads
from ckptio.errors import CheckpointError

hub = pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _state_dict(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]
    for i in range(n):
        dtype = dtypes[i % len(dtypes)]
        shape = (17 + i, 9) if i % 3 else (31 + i,)
        t = torch.randn(shape, generator=g) * 10
        sd[f"layers.{i}.weight"] = t.to(dtype)
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    return sd


def _hub_dir(tmp_path: Path, sd: dict[str, torch.Tensor], safe: bool, shard: int = 600) -> Path:
    out = tmp_path / ("hub-st" if safe else "hub-bin")
    out.mkdir()
    hub.save_torch_state_dict(sd, out, max_shard_size=shard, safe_serialization=safe)
    return out


def _hub_load(directory: Path) -> dict[str, torch.Tensor]:
    """What the oracle reads: every shard of the index through huggingface_hub."""
    names = [n for n in os.listdir(directory) if n.endswith(".index.json")]
    index = json.loads((directory / names[0]).read_text())
    merged: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        path = directory / shard
        merged.update(hub.load_state_dict_from_file(path, safe=path.suffix == ".safetensors"))
    return {k: merged[k] for k in index["weight_map"]}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch-bin"])
@pytest.mark.parametrize("mode", ["eager", "mmap", "index-path", "callable"])
def test_load_matches_huggingface_hub(tmp_path: Path, safe: bool, mode: str) -> None:
    sd = _state_dict()
    d = _hub_dir(tmp_path, sd, safe)
    assert len([n for n in os.listdir(d) if n.startswith(("model-", "pytorch_model-"))]) > 3
    expected = _hub_load(d)
    if mode == "eager":
        got = ckptio.load(d)
    elif mode == "mmap":
        got = ckptio.load(str(d), mmap=True)
    elif mode == "index-path":
        (index,) = [n for n in os.listdir(d) if n.endswith(".index.json")]
        got = ckptio.load(d / index)
    else:
        seen: list[str] = []
        got = ckptio.load(d, map_location=lambda s, loc: (seen.append(loc), s)[1])
        assert seen and set(seen) == {"cpu"}
    _same(got, expected)
    _same(got, {k: sd[k] for k in expected})


def test_load_meta_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _hub_dir(tmp_path, _state_dict(), safe=True)
    monkeypatch.setattr(_reads, "read_many", _fail)
    monkeypatch.setattr(_reads, "read_into", _fail)
    got = ckptio.load(d, map_location="meta")
    assert all(t.is_meta for t in got.values())
    assert {k: t.shape for k, t in got.items()} == {k: t.shape for k, t in _hub_load(d).items()}


def _fail(*_: Any, **__: Any) -> None:
    raise AssertionError("nothing should be read")


def test_one_read_plan_over_every_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight shards of large tensors: their storages are read by ONE read_many call."""
    sd = {f"w{i}": torch.randn(256, 1024 + i) for i in range(8)}  # > 1 MiB each: not "small"
    d = _hub_dir(tmp_path, sd, safe=True, shard=1_100_000)
    calls: list[list[str]] = []
    real = _core.io.read_many

    def spy(batches: Any, *args: Any) -> None:
        calls.append([os.path.basename(source.name) for source, _, _ in batches])
        real(batches, *args)

    monkeypatch.setattr(_core.io, "read_many", spy)
    got = ckptio.load(d)
    _same(got, sd)
    assert len(calls) == 1 and len(calls[0]) == 8


def test_mixed_formats_in_one_directory(tmp_path: Path) -> None:
    """A safetensors shard, a ckptio torch zip shard, a torch.save zip shard and a legacy
    (pre-1.6) shard, one hand-written index."""
    sd = _state_dict(8)
    names = list(sd)
    parts = [names[0:3], names[3:5], names[5:7], names[7:]]
    files = ["a.safetensors", "b.bin", "c.pt", "d-legacy.bin"]
    d = tmp_path / "mixed"
    d.mkdir()
    safetensors_torch.save_file({k: sd[k] for k in parts[0]}, str(d / files[0]))
    ckptio.save({k: sd[k] for k in parts[1]}, d / files[1])
    torch.save({k: sd[k] for k in parts[2]}, d / files[2])
    torch.save({k: sd[k] for k in parts[3]}, d / files[3], _use_new_zipfile_serialization=False)
    weight_map = {k: f for part, f in zip(parts, files, strict=True) for k in part}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.index.json").write_text(json.dumps(index))
    _same(ckptio.load(d), {k: sd[k] for k in weight_map})
    with ckptio.open(d) as h:  # open reads zip and safetensors shards
        _same(h.get_tensors(names[:7]), {k: sd[k] for k in names[:7]})


@pytest.mark.parametrize("how", ["load", "open"])
def test_staged_device_load_shares_one_ring(
    tmp_path: Path, staged_cpu: list[Any], how: str
) -> None:
    """A staged map_location (CUDA on a GPU host; the CPU stands in): every shard's storages
    go through one staging target, so one ring for the whole directory."""
    copiers = staged_cpu
    sd = {f"w{i}": torch.randn(64, 1024 + i) for i in range(6)}
    d = _hub_dir(tmp_path, sd, safe=False, shard=300_000)
    if how == "load":
        got = ckptio.load(d, map_location="cpu")
    else:
        with ckptio.open(d, map_location="cpu") as h:
            got = h.get_tensors()
            part = h.get_slices({"w0": slice(3, 9), "w5": (slice(None), slice(2, 5))})
        assert torch.equal(part["w0"], sd["w0"][3:9])
        assert torch.equal(part["w5"], sd["w5"][:, 2:5])
    _same(got, sd)
    assert len(copiers) == 1 and copiers[0].allocated > 0


def test_lone_weights_file_directory(tmp_path: Path) -> None:
    sd = _state_dict(4)
    d = tmp_path / "one"
    d.mkdir()
    hub.save_torch_state_dict(sd, d)  # one shard: model.safetensors, no index
    assert sorted(os.listdir(d)) == ["model.safetensors"]
    _same(ckptio.load(d), safetensors_torch.load_file(str(d / "model.safetensors")))
    with ckptio.open(d) as h:
        assert h.keys() == list(safetensors_torch.load_file(str(d / "model.safetensors")))


# ---------------------------------------------------------------------------------- open
def test_open_is_lazy_and_batches_across_shards(tmp_path: Path) -> None:
    sd = _state_dict()
    d = _hub_dir(tmp_path, sd, safe=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    first, last = next(iter(index)), list(index)[-1]
    with ckptio.open(d) as h:
        assert h.keys() == list(index)
        assert len(h) == len(index) and first in h and "nope" not in h
        # Listing opened nothing: a shard removed now only fails when it is read.
        os.remove(d / index[last])
        assert torch.equal(h[first], sd[first])
        assert h.info(first).shape == tuple(sd[first].shape)
        assert h.shard_of(first) == index[first]
        with pytest.raises(FileNotFoundError):
            h[last]
        others = [k for k in index if index[k] != index[last]]
        _same(h.get_tensors(others), {k: sd[k] for k in others})
        with pytest.raises(KeyError, match="nope"):
            h["nope"]
    with pytest.raises(ValueError, match="closed"):
        h.get_tensors(others)


def test_open_torch_bin_shards_keep_parameters(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20))
    sd = dict(model.state_dict(keep_vars=True))
    d = tmp_path / "bin"
    d.mkdir()
    hub.save_torch_state_dict(sd, d, max_shard_size=3000, safe_serialization=False)
    with ckptio.open(d) as h:
        for k, t in h.get_tensors().items():
            assert isinstance(t, torch.nn.Parameter) and torch.equal(t, sd[k])


# ------------------------------------------------------------------------ per-rank slices
class _CountingReads:
    """Counts the bytes every host read asks for, single- or multi-source."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.ranges = 0
        real_one, real_many = _reads.read_into, _reads.read_many

        def one(source: Any, requests: Any, *a: Any) -> None:
            self._count(requests)
            real_one(source, requests, *a)

        def many(batches: Any, *a: Any) -> None:
            for _, requests in batches:
                self._count(requests)
            real_many(batches, *a)

        monkeypatch.setattr(_reads, "read_into", one)
        monkeypatch.setattr(_reads, "read_many", many)

    def _count(self, requests: Any) -> None:
        values = memoryview(requests).cast("B").cast("Q")
        self.bytes += sum(values[1::3])
        self.ranges += len(values) // 3


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dim", [0, -1], ids=["rows", "columns"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch-bin"])
def test_rank_slices_read_only_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int, dim: int, safe: bool
) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {f"w{i}": torch.randn(96, 64 + 8 * i, generator=g) for i in range(6)}
    sd["bias"] = torch.randn(96, generator=g)
    d = _hub_dir(tmp_path, sd, safe=safe, shard=60_000)
    for rank in range(world):
        counter = _CountingReads(monkeypatch)

        def spec(name: str, shape: tuple[int, ...], rank: int = rank) -> Any:
            return ckptio.rank_slice(shape, rank, world, dim=dim if len(shape) > 1 else 0)

        with ckptio.open(d) as h:
            got = h.get_slices(spec)
        wanted = 0
        for name, t in sd.items():
            index = spec(name, tuple(t.shape))
            assert torch.equal(got[name], t[index]), name
            wanted += t[index].numel() * t.element_size()
        assert wanted <= counter.bytes <= 1.05 * wanted
        if dim == 0:
            assert counter.ranges == len(sd)  # one range per tensor
        else:  # one run per row of each matrix (never the whole tensor), one for the bias
            assert counter.ranges == 96 * (len(sd) - 1) + 1
        monkeypatch.undo()


def test_get_slices_mapping_and_skips(tmp_path: Path) -> None:
    sd = {"a": torch.arange(60.0).reshape(6, 10), "b": torch.arange(8), "c": torch.ones(3)}
    d = _hub_dir(tmp_path, sd, safe=True, shard=100)
    with ckptio.open(d) as h:
        got = h.get_slices({"a": (slice(2, 4), slice(None, None, 3)), "b": slice(5, None)})
        assert list(got) == ["a", "b"]
        assert torch.equal(got["a"], sd["a"][2:4, ::3]) and torch.equal(got["b"], sd["b"][5:])
        got = h.get_slices(lambda n, s: None if n == "c" else ...)
        assert list(got) == ["a", "b"]
    with ckptio.open(d / "model-00001-of-00002.safetensors") as one:  # a single file too
        (name,) = one.keys()
        assert torch.equal(one.get_slices({name: slice(1, 2)})[name], sd[name][1:2])


def test_rank_slice_splits_as_tensor_split() -> None:
    for size in (0, 1, 7, 8, 96):
        for world in (1, 2, 3, 4):
            parts = torch.arange(size).tensor_split(world)
            for rank in range(world):
                (index,) = ckptio.rank_slice((size,), rank, world)
                assert torch.equal(torch.arange(size)[index], parts[rank])
    assert ckptio.rank_slice((4, 6), 1, 2, dim=-1) == (slice(None), slice(3, 6))
    with pytest.raises(ValueError, match="rank"):
        ckptio.rank_slice((4,), 2, 2)
    with pytest.raises(ValueError, match="dim"):
        ckptio.rank_slice((4,), 0, 2, dim=1)


# ------------------------------------------------------------------------------ load_into
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch-bin"])
def test_load_into_a_model_from_a_directory(
    tmp_path: Path, safe: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    source = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)))
    d = tmp_path / "m"
    d.mkdir()
    hub.save_torch_state_dict(
        source.state_dict(), d, max_shard_size=40_000, safe_serialization=safe
    )
    calls: list[int] = []
    real = _core.io.read_many
    monkeypatch.setattr(_core.io, "read_many", lambda b, *a: (calls.append(len(b)), real(b, *a))[1])
    target = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)))
    keys = ckptio.load_into(target, d)
    assert keys == ckptio.IncompatibleKeys([], [])
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert calls == [len(os.listdir(d)) - 1]  # every shard but the index, one plan


def test_load_into_directory_reports_every_problem(tmp_path: Path) -> None:
    sd = {"a": torch.ones(4, 4), "b": torch.ones(3), "c": torch.ones(2)}
    d = _hub_dir(tmp_path, sd, safe=True, shard=40)
    target = {"a": torch.zeros(4, 5), "b": torch.zeros(3), "d": torch.zeros(1)}
    with pytest.raises(RuntimeError) as e:
        ckptio.load_into(target, d)
    text = str(e.value)
    assert "'c'" in text and "'d'" in text and "mismatch for 'a'" in text
    assert torch.equal(target["b"], torch.zeros(3))  # nothing was read
    keys = ckptio.load_into({"b": torch.zeros(3)}, d, strict=False)
    assert keys.unexpected_keys == ["a", "c"]


def test_load_into_a_safetensors_file(tmp_path: Path) -> None:
    sd = _state_dict(6)
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(sd, str(path))
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    ckptio.load_into(target, path)
    _same(target, sd)


# ---------------------------------------------------------------------------- bad input
def _broken(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    sd = {"a": torch.ones(4), "b": torch.full((3,), 2.0), "c": torch.zeros(2)}
    d = _hub_dir(tmp_path, sd, safe=True, shard=20)
    index_path = d / "model.safetensors.index.json"
    return d, json.loads(index_path.read_text())


def _write(d: Path, index: dict[str, Any]) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _all_fail(d: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ckptio.load(d)
    with pytest.raises(CheckpointError, match=match):
        with ckptio.open(d) as h:
            h.get_tensors()
    with pytest.raises(CheckpointError, match=match):
        ckptio.load_into({"a": torch.zeros(4), "b": torch.zeros(3), "c": torch.zeros(2)}, d)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    d, index = _broken(tmp_path)
    os.remove(d / index["weight_map"]["b"])
    _all_fail(d, r"shard 'model-0000\d-of-0000\d.safetensors' is missing")


def test_tensor_listed_in_two_shards(tmp_path: Path) -> None:
    d, index = _broken(tmp_path)
    text = json.dumps(index).replace('"weight_map": {', '"weight_map": {"a": "x.safetensors", ')
    (d / "model.safetensors.index.json").write_text(text)
    _all_fail(d, "'a' appears twice")


def test_tensor_in_a_shard_the_index_does_not_list(tmp_path: Path) -> None:
    d, index = _broken(tmp_path)
    del index["weight_map"]["b"]
    _write(d, index)
    _all_fail(d, r"holds tensor 'b', but the index .* does not list it")


def test_tensor_listed_in_the_wrong_shard(tmp_path: Path) -> None:
    d, index = _broken(tmp_path)
    index["weight_map"]["a"], index["weight_map"]["b"] = (
        index["weight_map"]["b"],
        index["weight_map"]["a"],
    )
    _write(d, index)
    _all_fail(d, r"holds tensor '[ab]', but the index .* lists it in")


def test_shard_header_disagrees_with_index(tmp_path: Path) -> None:
    d, index = _broken(tmp_path)
    shard = index["weight_map"]["c"]
    safetensors_torch.save_file({"c": torch.zeros(2), "extra": torch.ones(1)}, str(d / shard))
    _all_fail(d, "holds tensor 'extra'")
    safetensors_torch.save_file({"other": torch.zeros(2)}, str(d / shard))
    _all_fail(d, "holds tensor 'other'")


def test_total_size_that_does_not_match(tmp_path: Path) -> None:
    d, index = _broken(tmp_path)
    assert ckptio.load(d)  # the hub's own total_size passes
    index["metadata"]["total_size"] += 4
    _write(d, index)
    with pytest.raises(CheckpointError, match="total_size is 40 bytes, but the shards hold 36"):
        ckptio.load(d)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", ""])
def test_shard_names_stay_inside_the_directory(tmp_path: Path, name: str) -> None:
    d, index = _broken(tmp_path)
    shutil.copy(d / index["weight_map"]["a"], tmp_path / "outside.safetensors")
    index["weight_map"]["a"] = name
    _write(d, index)
    _all_fail(d, "is not a file name inside the index's directory")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not a JSON index"),
        ('{"weight_map": []}', 'needs a "weight_map" object'),
        ('{"weight_map": {"a": 1}}', 'needs a "weight_map" object'),
        ('{"metadata": {"total_size": "12"}, "weight_map": {}}', "not a byte count"),
        ("[" * 100_000, "not a JSON index"),
    ],
)
def test_malformed_index(tmp_path: Path, text: str, match: str) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        ckptio.load(d)


def test_directories_without_one_clear_checkpoint(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for call in (ckptio.load, ckptio.open, lambda d: ckptio.load_into({}, d)):
        # As torch.load for any directory: IsADirectoryError, saying what was looked for.
        with pytest.raises(IsADirectoryError, match="not a model directory: no .*index"):
            call(empty)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.safetensors.index.json").write_text('{"weight_map": {}}')
    (two / "b.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="several indexes"):
        ckptio.load(two)
    files = tmp_path / "files"
    files.mkdir()
    for n in ("x.pt", "y.pt"):
        torch.save({"a": torch.ones(1)}, files / n)
    with pytest.raises(CheckpointError, match="several weights files"):
        ckptio.load(files)


def test_safetensors_index_preferred_over_bin(tmp_path: Path) -> None:
    """A repository that ships both layouts loads its safetensors shards, as transformers
    does."""
    sd = _state_dict(4)
    d = tmp_path / "both"
    d.mkdir()
    hub.save_torch_state_dict(sd, d, max_shard_size=500, safe_serialization=False)
    hub.save_torch_state_dict(
        {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, d, max_shard_size=500
    )
    got = ckptio.load(d)
    assert torch.equal(got["layers.1.weight"], sd["layers.1.weight"] + 1)
