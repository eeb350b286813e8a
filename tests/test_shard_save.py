"""Model directories saved with ``ckptio.save(state_dict, directory, max_shard_size=...)``.

The oracle is huggingface_hub (``save_torch_state_dict`` and its loaders), which is what
transformers writes and reads:

- the same state dict saved by both gives the same file names, the same index (byte for byte:
  weight_map, its order, total_size, metadata) and, for safetensors, the same shard files
  (byte for byte where a header's metadata has one entry: safetensors writes a multi-entry
  metadata map in hash order; else the same header and the same data bytes);
- each side reads the other's directories: ``load_torch_model`` / ``load_state_dict_from_file``
  read ckptio's, ``ckptio.load`` reads every shard huggingface_hub writes.

Then the directory's atomicity: an exception or a kill mid-save leaves the previous directory
complete and no temporary directory behind the next save; what an existing path may be.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import types
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch as st
import torch
from torch import nn

# The oracle; make test-compat's environments (torch 2.5, 2.9) do not install it.
pytest.importorskip("huggingface_hub")
from huggingface_hub import (  # noqa: E402
    load_state_dict_from_file,
    load_torch_model,
    save_torch_state_dict,
    split_torch_state_dict_into_shards,
)
from huggingface_hub.serialization._base import parse_size_to_int  # noqa: E402

import ckptio
from ckptio import _files, _shard_writer
from hostile.child import child_env

from conftest import assert_same, assert_same_sharing, make_model, same_values, torch_can_save

FORMATS = ["safetensors", "torch"]
INDEX = {"safetensors": "model.safetensors.index.json", "torch": "pytorch_model.bin.index.json"}
SINGLE = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin"}


# ---------------------------------------------------------------------------------- helpers
def hub_save(sd: dict[str, Any], directory: Path, fmt: str, max_shard_size: Any, **kw: Any) -> None:
    """huggingface_hub's save (it edits the state dict and metadata it is given: copies)."""
    directory.mkdir()
    if "metadata" in kw:
        kw["metadata"] = dict(kw["metadata"])
    save_torch_state_dict(
        dict(sd),
        directory,
        max_shard_size=max_shard_size,
        safe_serialization=fmt == "safetensors",
        **kw,
    )


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def hub_read(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory, as huggingface_hub reads it: the index's shards (or the
    single file) through load_state_dict_from_file, in the index's order."""
    names = listing(directory)
    index = [n for n in names if n.endswith(".index.json")]
    if index:
        weight_map = json.loads((directory / index[0]).read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    else:
        assert len(names) == 1, names
        files = names
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(
            load_state_dict_from_file(
                directory / name, weights_only=True, safe=name.endswith(".safetensors")
            )
        )
    return out


def ckptio_read_shards(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """ckptio.load of every file in the directory but the index, by name."""
    return {n: ckptio.load(directory / n) for n in listing(directory) if not n.endswith(".json")}


def safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def assert_same_directory(ours: Path, theirs: Path, fmt: str) -> None:
    """ckptio's directory `ours` is what huggingface_hub wrote in `theirs`."""
    assert listing(ours) == listing(theirs)
    for name in listing(ours):
        a, b = ours / name, theirs / name
        if name.endswith(".json"):
            assert a.read_bytes() == b.read_bytes(), name  # json.dump(indent=2), same order
        elif fmt == "safetensors":
            header_a, data_a = safetensors_header(a)
            header_b, data_b = safetensors_header(b)
            assert header_a == header_b, name
            assert data_a == data_b, name
            if len(header_b.get("__metadata__", {})) <= 1:
                assert a.read_bytes() == b.read_bytes(), name
        else:  # torch zip files: ckptio's layout, torch's content, read by both loaders
            reference = torch.load(b)
            for loaded in (torch.load(a), ckptio.load(a)):
                assert_same(loaded, reference, name)  # keys in order, strides, values
                assert_same_sharing(loaded, reference)


def assert_tensors_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes; strides may differ. (A safetensors file's own
    order is by dtype and name, not the state dict's.)"""
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert same_values(got[k], v), k


def seeded(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------------------ state dicts (ids)
def _layers() -> dict[str, torch.Tensor]:
    return {f"layers.{i}.weight": seeded(8 + i, 16, seed=i) for i in range(6)} | {
        "norm.bias": seeded(16, seed=9)
    }


def _tied() -> dict[str, torch.Tensor]:
    emb = seeded(32, 16)
    return {
        "model.embed.weight": emb,
        "model.layer.weight": seeded(16, 16, seed=1),
        "lm_head.weight": emb,  # tied: kept once (safetensors), shared in one shard (torch)
        "model.norm.weight": seeded(16, seed=2),
    }


def _big() -> dict[str, torch.Tensor]:
    # 2 KiB tensors around a 40 KB one: larger than the limit, it gets a shard of its own.
    return {"a": seeded(512), "huge": seeded(10_000), "b": seeded(512), "c": seeded(512)}


def _scalars() -> dict[str, torch.Tensor]:
    return {"step": torch.tensor(3), "w": seeded(24, 24), "scale": torch.tensor(0.5)}


def _empties() -> dict[str, torch.Tensor]:
    return {"e0": torch.empty(0), "w": seeded(300), "e1": torch.zeros(0, 3), "v": seeded(300)}


def _noncontiguous() -> dict[str, torch.Tensor]:
    return {
        "t": seeded(20, 30).t(),  # each covers its whole storage, in another order
        "s": seeded(6, 8, 5, seed=1).permute(2, 0, 1),
        "w": seeded(64),
    }


def _shared_views_torch() -> dict[str, torch.Tensor]:
    # q, k, v views of one fused storage: torch keeps them in one shard, sharing it.
    fused = seeded(3 * 16, 16)
    q, k, v = fused.split(16)
    return {"q": q, "x": seeded(100), "k": k, "v": v, "y": seeded(400)}


STATE_DICTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "layers": _layers,
    "tied": _tied,
    "big-tensor": _big,
    "scalars": _scalars,
    "empty-tensors": _empties,
    "non-contiguous": _noncontiguous,
}
# Shard limits: several shards, and one that holds everything.
LIMITS = {"sharded": 2000, "one-shard": "5GB"}


# ------------------------------------------------------------------- same files as the hub
@pytest.mark.parametrize("limit", list(LIMITS.values()), ids=list(LIMITS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", list(STATE_DICTS))
def test_same_files_as_huggingface_hub(tmp_path: Path, which: str, fmt: str, limit: Any) -> None:
    sd = STATE_DICTS[which]()
    ckptio.save(sd, tmp_path / "ours", max_shard_size=limit, format=fmt)
    hub_save(sd, tmp_path / "theirs", fmt, limit)
    assert_same_directory(tmp_path / "ours", tmp_path / "theirs", fmt)
    if limit == LIMITS["one-shard"]:
        assert listing(tmp_path / "ours") == [SINGLE[fmt]]
    else:
        assert INDEX[fmt] in listing(tmp_path / "ours")


def test_sharded_layout_and_index_schema(tmp_path: Path) -> None:
    sd = _layers()
    ckptio.save(sd, tmp_path / "d", max_shard_size=2000, format="safetensors")
    names = listing(tmp_path / "d")
    shards = [n for n in names if n.endswith(".safetensors")]
    count = len(shards)
    assert count > 2
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=2000)
    assert index["metadata"] == {"total_size": split.metadata["total_size"]}
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    for name in shards:
        with st.safe_open(str(tmp_path / "d" / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == sorted(
                k for k, v in index["weight_map"].items() if v == name
            )


def test_shared_views_stay_in_one_torch_shard(tmp_path: Path) -> None:
    sd = _shared_views_torch()
    ckptio.save(sd, tmp_path / "ours", max_shard_size=1000)  # format="torch" is the default
    hub_save(sd, tmp_path / "theirs", "torch", 1000)
    assert_same_directory(tmp_path / "ours", tmp_path / "theirs", "torch")
    index = json.loads((tmp_path / "ours" / INDEX["torch"]).read_text())
    assert len({index["weight_map"][k] for k in "qkv"}) == 1
    # The fused storage counts once in total_size, as the hub counts it.
    fused = sd["q"].untyped_storage().nbytes()
    assert index["metadata"]["total_size"] == fused + 400 + 1600
    shard = ckptio.load(tmp_path / "ours" / index["weight_map"]["q"])
    assert shard["q"].untyped_storage().data_ptr() == shard["k"].untyped_storage().data_ptr()


def test_tied_tensors_kept_once_with_the_hubs_metadata(tmp_path: Path) -> None:
    sd = _tied()
    for limit, where in ((2000, "index"), ("1GB", "file")):
        ours = tmp_path / f"ours-{where}"
        ckptio.save(sd, ours, max_shard_size=limit, format="safetensors", metadata={"note": "x"})
        hub_save(sd, tmp_path / f"theirs-{where}", "safetensors", limit, metadata={"note": "x"})
        assert_same_directory(ours, tmp_path / f"theirs-{where}", "safetensors")
        loaded = hub_read(ours)
        # The alphabetically first name is kept, the other recorded as {dropped: kept}.
        assert "lm_head.weight" in loaded and "model.embed.weight" not in loaded
        if where == "index":
            meta = json.loads((ours / INDEX["safetensors"]).read_text())["metadata"]
        else:
            with st.safe_open(str(ours / SINGLE["safetensors"]), "pt") as f:
                meta = f.metadata()
            assert meta["format"] == "pt"
        assert meta["model.embed.weight"] == "lm_head.weight" and meta["note"] == "x"


def test_tied_transposed_tensors_kept_once(tmp_path: Path) -> None:
    # huggingface_hub fails on these (its end-pointer helper views the tensor as 1-d); ckptio
    # applies its rule: both cover the storage, the first name is kept.
    w = seeded(4, 6)
    ckptio.save({"b": w.t(), "a": w}, tmp_path / "d", max_shard_size="1GB", format="safetensors")
    with st.safe_open(str(tmp_path / "d" / SINGLE["safetensors"]), "pt") as f:
        assert list(f.keys()) == ["a"] and f.metadata() == {"format": "pt", "b": "a"}
        assert torch.equal(f.get_tensor("a"), w)


def test_partial_views_refused_for_safetensors_as_the_hub_refuses(tmp_path: Path) -> None:
    base = seeded(100)
    sd = {"first": base[:50], "second": base[50:]}
    with pytest.raises(RuntimeError, match="no suitable name to keep"):
        hub_save(sd, tmp_path / "theirs", "safetensors", "1GB")
    with pytest.raises(ValueError, match=r"'first', 'second' view only part of their storage"):
        ckptio.save(sd, tmp_path / "ours", max_shard_size="1GB", format="safetensors")
    assert not (tmp_path / "ours").exists()
    # torch keeps the storage whole: accepted, as by the hub.
    ckptio.save(sd, tmp_path / "ours", max_shard_size="1GB")
    hub_save(sd, tmp_path / "theirs-torch", "torch", "1GB")
    assert_same_directory(tmp_path / "ours", tmp_path / "theirs-torch", "torch")


SAFETENSORS_DTYPES = [
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "float8_e5m2", "float8_e4m3fn",
    "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2",
]  # fmt: skip


def _every_dtype() -> dict[str, torch.Tensor]:
    """A tensor of each dtype safetensors stores that this torch has (and can save), of
    random bytes: every bit pattern, NaNs included."""
    out = {}
    for i, name in enumerate(SAFETENSORS_DTYPES):
        dtype = getattr(torch, name, None)
        if dtype is None or not torch_can_save(dtype):
            continue
        g = torch.Generator().manual_seed(i)
        raw = torch.randint(0, 256, (6, 8), dtype=torch.uint8, generator=g)
        out[name] = raw % 2 == 0 if dtype == torch.bool else raw.view(dtype)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_safetensors_dtype(tmp_path: Path, fmt: str) -> None:
    sd = _every_dtype()
    ckptio.save(sd, tmp_path / "ours", max_shard_size=100, format=fmt)
    hub_save(sd, tmp_path / "theirs", fmt, 100)
    assert_same_directory(tmp_path / "ours", tmp_path / "theirs", fmt)
    loaded = hub_read(tmp_path / "ours")
    assert sorted(loaded) == sorted(sd)
    assert_tensors_equal({k: loaded[k] for k in sd}, sd)


def test_empty_state_dict_is_one_empty_file(tmp_path: Path) -> None:
    # huggingface_hub writes no file at all for {}, a directory nothing loads; ckptio writes
    # one empty shard, which both loaders read as {}.
    for fmt in FORMATS:
        d = tmp_path / fmt
        ckptio.save({}, d, max_shard_size="1GB", format=fmt)
        assert listing(d) == [SINGLE[fmt]]
        assert hub_read(d) == {}
        assert ckptio.load(d / SINGLE[fmt]) == {}
        assert load_torch_model(nn.Module(), d, strict=True, safe=fmt == "safetensors") is not None


# ------------------------------------------------------------------ each reads the other's
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("limit", list(LIMITS.values()), ids=list(LIMITS))
def test_huggingface_hub_loads_ckptio_directories_into_a_model(
    tmp_path: Path, fmt: str, limit: Any
) -> None:
    model = make_model(seed=1)
    ckptio.save(model.state_dict(), tmp_path / "d", max_shard_size=limit, format=fmt)
    fresh = make_model(seed=2)
    result = load_torch_model(fresh, tmp_path / "d", strict=False, safe=fmt == "safetensors")
    # The tied lm_head/tok_emb weight is stored once in safetensors, under the first name
    # (huggingface_hub's rule): loading it into the model fills both.
    assert result.unexpected_keys == []
    assert result.missing_keys == (["tok_emb.weight"] if fmt == "safetensors" else [])
    assert_same(model.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch"])
@pytest.mark.parametrize("which", list(STATE_DICTS))
def test_ckptio_loads_every_shard_huggingface_hub_writes(
    tmp_path: Path, which: str, safe: bool
) -> None:
    sd = STATE_DICTS[which]()
    d = tmp_path / "theirs"
    hub_save(sd, d, "safetensors" if safe else "torch", 2000)
    shards = ckptio_read_shards(d)
    merged = {k: v for shard in shards.values() for k, v in shard.items()}
    expected = hub_read(d)
    assert sorted(merged) == sorted(expected)
    assert_tensors_equal({k: merged[k] for k in expected}, expected)
    for name, shard in shards.items():
        if safe:  # (safetensors' own order of zero-size tensors varies from run to run)
            reference = st.load_file(str(d / name))
            assert_same(dict(sorted(shard.items())), dict(sorted(reference.items())), name)
        else:  # torch's object: structure, strides, sharing
            reference = torch.load(d / name, weights_only=True)
            assert_same(shard, reference, name)
            assert_same_sharing(shard, reference)


# ------------------------------------------------------------------------ max_shard_size
@pytest.mark.parametrize("text", ["5GB", "500MB", "1.5GB", " 10 kb ", "2TB", "7mb", "0.5KB"])
def test_size_strings_parse_as_the_hub_parses_them(text: str) -> None:
    assert _shard_writer.parse_size(text) == parse_size_to_int(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10KiB", 10 << 10), ("1GiB", 1 << 30), ("3 mib", 3 << 20), ("1TiB", 1 << 40), (4096, 4096)],
)
def test_binary_units_and_ints(text: Any, expected: int) -> None:
    assert _shard_writer.parse_size(text) == expected


def test_a_size_string_splits_as_its_bytes(tmp_path: Path) -> None:
    sd = _layers()
    ckptio.save(sd, tmp_path / "kib", max_shard_size="2KiB", format="safetensors")
    hub_save(sd, tmp_path / "theirs", "safetensors", 2048)
    assert_same_directory(tmp_path / "kib", tmp_path / "theirs", "safetensors")


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        ("5G", ValueError, "no known unit"),
        ("GB", ValueError, "'' is not a number"),
        ("abcMB", ValueError, "'abc' is not a number"),
        ("5 XB", ValueError, "no known unit"),
        ("-1GB", ValueError, "at least 1 byte"),
        ("0KB", ValueError, "at least 1 byte"),
        ("nanGB", ValueError, "not a finite size"),
        ("infMB", ValueError, "not a finite size"),
        (0, ValueError, "at least 1 byte"),
        (-5, ValueError, "at least 1 byte"),
        (True, TypeError, "got bool"),
        (1.5e9, TypeError, "got float"),
    ],
)
def test_bad_max_shard_size(tmp_path: Path, value: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        ckptio.save({"w": torch.ones(2)}, tmp_path / "d", max_shard_size=value)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_tensor_values_are_refused(tmp_path: Path, fmt: str) -> None:
    sd = {"w": torch.ones(2), "step": 3, "name": "bnb", 7: torch.ones(1)}
    with pytest.raises(TypeError, match=r"'step' \(int\), 'name' \(str\), 7 \(Tensor\)"):
        ckptio.save(sd, tmp_path / "d", max_shard_size="1GB", format=fmt)
    with pytest.raises(TypeError, match="flat dict of str -> torch.Tensor, got list"):
        ckptio.save([torch.ones(1)], tmp_path / "d", max_shard_size="1GB", format=fmt)
    assert os.listdir(tmp_path) == []


def test_bad_combinations(tmp_path: Path) -> None:
    sd = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="f must be a path"), open(os.devnull, "wb") as f:
        ckptio.save(sd, f, max_shard_size="1GB")
    with pytest.raises(ValueError, match="clone_shared does not apply"):
        ckptio.save(
            sd, tmp_path / "d", max_shard_size="1GB", format="safetensors", clone_shared=True
        )
    with pytest.raises(ValueError, match="metadata applies only to format='safetensors'"):
        ckptio.save(sd, tmp_path / "d", max_shard_size="1GB", metadata={"a": "b"})
    with pytest.raises(ValueError, match="'total_size' is the index's own"):
        ckptio.save(
            sd,
            tmp_path / "d",
            max_shard_size="1GB",
            format="safetensors",
            metadata={"total_size": "1"},
        )
    with pytest.raises(ValueError, match="format must be 'torch' or 'safetensors'"):
        ckptio.save(sd, tmp_path / "d", max_shard_size="1GB", format="npz")
    with pytest.raises(ValueError, match="which safetensors cannot store"):
        ckptio.save(
            {"c": torch.ones(2, dtype=torch.complex128)},
            tmp_path / "d",
            max_shard_size=8,
            format="safetensors",
        )
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- what the path may be
def test_without_max_shard_size_a_directory_is_refused_as_torch_refuses_it(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(RuntimeError, match="Is a directory"):  # torch's C++ writer's error
        torch.save({"w": torch.ones(2)}, tmp_path / "d")
    with pytest.raises(IsADirectoryError) as info:
        ckptio.save({"w": torch.ones(2)}, tmp_path / "d")
    assert info.value.filename == str(tmp_path / "d")
    assert listing(tmp_path) == ["d"] and listing(tmp_path / "d") == []


def test_an_existing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_bytes(b"mine")
    with pytest.raises(NotADirectoryError) as info:
        ckptio.save({"w": torch.ones(2)}, path, max_shard_size="1GB")
    assert info.value.filename == str(path) and "is not a directory" in str(info.value)
    assert path.read_bytes() == b"mine" and listing(tmp_path) == ["model"]


@pytest.mark.parametrize("other", ["config.json", "subdir", ".hidden"])
def test_a_directory_with_other_files_is_refused(tmp_path: Path, other: str) -> None:
    d = tmp_path / "d"
    ckptio.save(_layers(), d, max_shard_size=2000)
    before = {n: (d / n).read_bytes() for n in listing(d)}
    (d / other).mkdir() if other == "subdir" else (d / other).write_text("{}")
    with pytest.raises(FileExistsError) as info:
        ckptio.save({"w": torch.ones(2)}, d, max_shard_size="1GB")
    assert info.value.filename == str(d) and other in str(info.value)
    assert {n: (d / n).read_bytes() for n in listing(d) if n != other} == before
    assert listing(tmp_path) == ["d"]  # no temporary directory left


def test_replaces_a_checkpoint_directory_of_either_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchanged: list[bool] = []
    real_exchange = ckptio._core.io.exchange_paths

    def spy(a: str, b: str) -> bool:
        exchanged.append(real_exchange(a, b))
        return exchanged[-1]

    monkeypatch.setattr(ckptio._core.io, "exchange_paths", spy)
    d = tmp_path / "d"
    ckptio.save(_layers(), d, max_shard_size=2000)
    os.chmod(d, 0o750)
    ckptio.save(_tied(), d, max_shard_size="1GB", format="safetensors")
    assert exchanged == [True]  # this file system swaps the two names in one step
    assert listing(d) == [SINGLE["safetensors"]]  # the torch shards and index are gone
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    assert listing(tmp_path) == ["d"]
    ckptio.save(_layers(), d, max_shard_size=2000)
    hub_save(_layers(), tmp_path / "theirs", "torch", 2000)
    assert_same_directory(d, tmp_path / "theirs", "torch")
    # An empty directory is a checkpoint directory with nothing in it yet.
    (tmp_path / "empty").mkdir()
    ckptio.save(_layers(), tmp_path / "empty", max_shard_size="1GB")
    assert listing(tmp_path / "empty") == [SINGLE["torch"]]


def test_replaces_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    ckptio.save(_layers(), real, max_shard_size=2000, format="safetensors")
    link = tmp_path / "link"
    link.symlink_to(real)
    ckptio.save(_scalars(), link, max_shard_size="1GB", format="safetensors")
    assert link.is_symlink() and listing(real) == [SINGLE["safetensors"]]
    assert_tensors_equal(hub_read(real), _scalars())
    ckptio.save(_layers(), f"{link}/", max_shard_size="1GB")  # a trailing slash alike
    assert link.is_symlink() and listing(real) == [SINGLE["torch"]]
    assert listing(tmp_path) == ["link", "real"]


def test_without_renameat2_exchange_the_old_directory_is_renamed_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []

    def cannot_exchange(a: str, b: str) -> bool:
        calls.append((a, b))
        return False

    monkeypatch.setattr(ckptio._core.io, "exchange_paths", cannot_exchange)
    d = tmp_path / "d"
    ckptio.save(_layers(), d, max_shard_size=2000)
    assert calls == []  # a new directory is renamed into place
    ckptio.save(_scalars(), d, max_shard_size="1GB", format="safetensors")
    assert len(calls) == 1 and calls[0][1] == str(d)
    assert listing(d) == [SINGLE["safetensors"]] and listing(tmp_path) == ["d"]


def test_durable_save(tmp_path: Path) -> None:
    with ckptio.options(durable=True):
        ckptio.save(_layers(), tmp_path / "d", max_shard_size=2000, format="safetensors")
        ckptio.save(_tied(), tmp_path / "d", max_shard_size=2000, format="safetensors")
    hub_save(_tied(), tmp_path / "theirs", "safetensors", 2000)
    assert_same_directory(tmp_path / "d", tmp_path / "theirs", "safetensors")


# ------------------------------------------------------------------------------ atomicity
class _FailingPickler(pickle.Pickler):
    """A pickle_module's Pickler that fails on the third shard."""

    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _FailingPickler.made += 1  # type(self) is ckptio's subclass, one per shard
        if _FailingPickler.made == 3:
            raise RuntimeError("pickling failed")
        super().__init__(*args, **kwargs)


def test_an_exception_mid_save_keeps_the_previous_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "d"
    ckptio.save(_layers(), d, max_shard_size=2000)
    before = {n: (d / n).read_bytes() for n in listing(d)}
    failing = types.SimpleNamespace(Pickler=_FailingPickler)
    with pytest.raises(RuntimeError, match="pickling failed"):
        ckptio.save(_big(), d, pickle_module=failing, max_shard_size=2000)
    assert {n: (d / n).read_bytes() for n in listing(d)} == before
    assert listing(tmp_path) == ["d"]
    # The same for a new directory: nothing is left.
    _FailingPickler.made = 0
    with pytest.raises(RuntimeError, match="pickling failed"):
        ckptio.save(_big(), tmp_path / "new", pickle_module=failing, max_shard_size=2000)
    assert listing(tmp_path) == ["d"]
    # safetensors shards: a write that fails on the second shard.
    real_write = ckptio._safetensors.write
    written: list[Any] = []

    def write_then_fail(target: Any, plan: Any, **kwargs: Any) -> Any:
        written.append(plan)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        return real_write(target, plan, **kwargs)

    monkeypatch.setattr(ckptio._safetensors, "write", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ckptio.save(_layers(), d, max_shard_size=2000, format="safetensors")
    assert {n: (d / n).read_bytes() for n in listing(d)} == before
    assert listing(tmp_path) == ["d"]


# The child saves generation 1, then generation 2 and is SIGKILLed on the way (`where`).
KILL_SCRIPT = textwrap.dedent(
    """
    import os, pickle, signal, sys, types
    import torch
    import ckptio
    from ckptio import _shard_writer

    directory, fmt, where = sys.argv[1:4]

    def state(generation):
        return {f"w{i}": torch.full((300,), float(generation)) for i in range(6)}

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ckptio.save(state(1), directory, max_shard_size=2000, format=fmt)
    made = []

    class Pickler(pickle.Pickler):
        def __init__(self, *args, **kwargs):
            made.append(1)
            if len(made) == 3:
                die()
            super().__init__(*args, **kwargs)

    kwargs = {}
    if where == "mid-shards" and fmt == "torch":
        kwargs["pickle_module"] = types.SimpleNamespace(Pickler=Pickler)
    elif where == "mid-shards":
        real = ckptio._safetensors.write
        def write(target, plan, **kwargs):
            made.append(1)
            if len(made) == 3:
                die()
            return real(target, plan, **kwargs)
        ckptio._safetensors.write = write
    elif where == "after-swap":
        _shard_writer.shutil.rmtree = die  # the old directory is about to be removed
    ckptio.save(state(2), directory, max_shard_size=2000, format=fmt, **kwargs)
    print("not killed")
    """
)


@pytest.mark.parametrize("where", ["mid-shards", "after-swap"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_kill_mid_save_leaves_a_complete_directory(tmp_path: Path, fmt: str, where: str) -> None:
    d = tmp_path / "d"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(d), fmt, where],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)
    generation = 1 if where == "mid-shards" else 2
    expected = {f"w{i}": torch.full((300,), float(generation)) for i in range(6)}
    assert_tensors_equal(hub_read(d), expected)
    leftovers = [n for n in listing(tmp_path) if n != "d"]
    assert len(leftovers) == 1, leftovers  # the killed saver's temporary (or old) directory
    assert leftovers[0].startswith(".d.ckptio-") and leftovers[0].endswith(".tmp")
    # The next save removes it: its writer is dead.
    ckptio.save(_scalars(), d, max_shard_size="1GB", format=fmt)
    assert listing(tmp_path) == ["d"]
    assert_tensors_equal(hub_read(d), _scalars())


def test_a_live_savers_temporary_directory_is_left_alone(tmp_path: Path) -> None:
    live = tmp_path / _files.temp_file_name("d", os.getpid())
    live.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / _files.temp_file_name("d", int(child.stdout))
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    ckptio.save(_scalars(), tmp_path / "d", max_shard_size="1GB")
    assert sorted(listing(tmp_path)) == sorted(["d", live.name])


def test_the_callers_state_dict_and_metadata_are_left_alone(tmp_path: Path) -> None:
    sd = _tied()
    kept = copy.copy(sd)
    meta = {"note": "x"}
    ckptio.save(sd, tmp_path / "d", max_shard_size=2000, format="safetensors", metadata=meta)
    assert list(sd) == list(kept) and all(sd[k] is kept[k] for k in sd) and meta == {"note": "x"}


# ------------------------------------------------------------------ whole-directory loads
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("writer", ["ckptio", "huggingface_hub"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", list(STATE_DICTS))
def test_ckptio_loads_whole_directories(
    tmp_path: Path, which: str, fmt: str, writer: str, mmap: bool
) -> None:
    sd = STATE_DICTS[which]()
    d = tmp_path / "d"
    if writer == "ckptio":
        ckptio.save(sd, d, max_shard_size=2000, format=fmt)
    else:
        hub_save(sd, d, fmt, 2000)
    expected = hub_read(d)
    loaded = ckptio.load(d, mmap=mmap)
    index = json.loads((d / INDEX[fmt]).read_text())
    assert list(loaded) == list(index["weight_map"])  # the index's order
    assert_tensors_equal(loaded, expected)
    with ckptio.open(d) as handle:
        assert sorted(handle.keys()) == sorted(expected)
        assert_tensors_equal({k: handle[k] for k in handle.keys()}, expected)


def test_a_model_round_trips_through_a_directory(tmp_path: Path) -> None:
    model = make_model(seed=1)
    for fmt in FORMATS:
        d = tmp_path / fmt
        ckptio.save(model.state_dict(), d, max_shard_size=1500, format=fmt)
        loaded = ckptio.load(d)
        if fmt == "torch":  # the tied weights are still one storage
            tied = [
                loaded[k].untyped_storage().data_ptr() for k in ("tok_emb.weight", "lm_head.weight")
            ]
            assert tied[0] == tied[1]
        fresh = make_model(seed=2)
        fresh.load_state_dict(loaded, strict=fmt == "torch")
        assert_same(model.state_dict(), fresh.state_dict())
        fresh = make_model(seed=3)
        ckptio.load_into(fresh, d, strict=False)
        assert_same(model.state_dict(), fresh.state_dict())


# ------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_manifest_written_on_request_and_checked(tmp_path: Path, fmt: str) -> None:
    """save(..., manifest=True) lists every file of the directory (shards and index) with its
    size and CRC-32; a verified load and `ckptio verify` pass, and fail naming the shard once
    one byte of it changes. huggingface_hub still reads the directory."""
    from ckptio import _verify
    from ckptio.cli import main as cli

    sd = {f"w{i}": torch.randn(40, 30 + i) for i in range(6)}
    d = tmp_path / "m"
    ckptio.save(sd, d, max_shard_size=12_000, format=fmt, manifest=True)
    listed = json.loads((d / _verify.MANIFEST_NAME).read_text())["files"]
    on_disk = sorted(n for n in os.listdir(d) if n != _verify.MANIFEST_NAME)
    assert sorted(listed) == on_disk and len(on_disk) > 3
    for name, entry in listed.items():
        data = (d / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["crc32"] == f"{zlib.crc32(data):08x}"
    got = ckptio.load(d, verify=True)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert cli(["verify", str(d)]) == 0
    model = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(v)) for k, v in sd.items()})
    load_torch_model(model, d, safe=fmt == "safetensors")  # the manifest is no obstacle
    assert all(torch.equal(model[k], v) for k, v in sd.items())
    shard = next(n for n in on_disk if not n.endswith(".json"))
    raw = bytearray((d / shard).read_bytes())
    raw[-3] ^= 0x10  # a byte of the last tensor's data
    (d / shard).write_bytes(bytes(raw))
    with pytest.raises(ckptio.CheckpointError, match=shard):
        ckptio.load(d, verify=True)
    assert cli(["verify", str(d)]) == 1
    # Saved again over it (the manifest is one of the directory's own files): valid again.
    ckptio.save(sd, d, max_shard_size=12_000, format=fmt, manifest=True)
    ckptio.load(d, verify=True)


def test_manifest_needs_a_directory_save(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest applies to a directory save"):
        ckptio.save({"a": torch.ones(2)}, tmp_path / "a.pt", manifest=True)
