"""The load path's shortcuts: each must leave exactly what torch.load leaves.

* Loads create no reference cycles: dropping the result frees its tensors (and their memory)
  at once, not at the next full garbage collection.
* The shortcut that builds TypedStorage objects is only taken where it builds what the
  constructor builds.
* Many small storages (the arena and the directory reader's paths) load as torch loads them.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

import ckptio
from ckptio import _unpickler

from conftest import assert_same, assert_same_sharing


def _many_small(n: int = 300) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    dtypes = (torch.float32, torch.float16, torch.int64, torch.bool)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        numel = int(torch.randint(1, 2000, (1,), generator=g))
        t = torch.randint(0, 2, (numel,), generator=g).to(dtypes[i % 4])
        out[f"t{i}"] = t
    out["view"] = out["t0"][1:]  # shares t0's storage
    out["alias"] = out["t1"]
    return out


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights_only", "full"])
def test_result_freed_without_gc(tmp_path: Path, mmap: bool, weights_only: bool) -> None:
    path = tmp_path / "m.pt"
    ckptio.save(_many_small(20), path)
    ckptio.load(path, mmap=mmap, weights_only=weights_only)  # first-use imports make garbage
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        sd = ckptio.load(path, mmap=mmap, weights_only=weights_only)
        ref = weakref.ref(sd["t3"])
        assert ref() is not None
        del sd
        assert ref() is None, "a reference cycle keeps the loaded tensors alive"
        # Nor anything else of the load (the loader holds every storage it made).
        assert gc.collect() == 0, "the load left reference cycles behind"
    finally:
        if was_enabled:
            gc.enable()


def test_typed_storage_shortcut_is_taken_and_exact() -> None:
    assert _unpickler._direct_construction_matches()
    assert _unpickler._typed_storage is _unpickler._typed_storage_direct
    storage = torch.UntypedStorage(8)
    fast = _unpickler._typed_storage(storage, torch.int16)
    ref = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.int16, _internal=True)
    assert type(fast) is type(ref)
    assert fast.__dict__ == ref.__dict__
    assert fast._size() == ref._size() == 4
    # Anything but a plain UntypedStorage goes through the constructor and its checks.
    with pytest.raises(TypeError):
        _unpickler._typed_storage(object(), torch.int16)


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_many_small_storages_match_torch(tmp_path: Path, mmap: bool, writer: str) -> None:
    sd = _many_small()
    path = tmp_path / "small.pt"
    (torch.save if writer == "torch" else ckptio.save)(sd, path)
    ours = ckptio.load(path, mmap=mmap)
    theirs = torch.load(path, mmap=mmap)
    assert_same(ours, theirs)
    assert_same_sharing(ours, theirs)
    assert_same(ours, sd)


def test_pickle_of_tensors_with_python_state_is_torchs(tmp_path: Path) -> None:
    """The fast reducer's state test (the tensor's __dict__) must send exactly the tensors
    torch pickles with state down torch's own path."""
    import zipfile

    stateful = torch.arange(4.0)
    stateful.note = "kept"  # type: ignore[attr-defined]
    probed = torch.arange(3)
    _ = probed.__dict__  # an empty __dict__ is no state
    objs = {"stateful": stateful, "probed": probed, "plain": torch.ones(2)}
    torch.save(objs, tmp_path / "t.pt")
    with ckptio.options(crc32=True):
        ckptio.save(objs, tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "t.pt") as zt, zipfile.ZipFile(tmp_path / "c.pt") as zc:
        assert zc.read("c/data.pkl") == zt.read("t/data.pkl")
    loaded = ckptio.load(tmp_path / "c.pt", weights_only=False)
    assert loaded["stateful"].note == "kept"
