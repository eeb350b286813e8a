"""ckptio: fast, safe drop-in replacements for torch.save and torch.load.

>>> import ckptio
>>> ckptio.save(model.state_dict(), "model.pt")      # loads with stock torch.load too
>>> state = ckptio.load("model.pt")                   # weights-only by default
>>> state = ckptio.load("model.pt", mmap=True)        # zero-copy views of the file
>>> ckptio.save(state, "model.safetensors", format="safetensors")
>>> with ckptio.open("model.pt") as ck:               # lazy: reads only what you ask for
...     rows = ck.get_slice("fc.weight")[0:10]
>>> fut = ckptio.async_save(state, "model.pt")        # returns after a snapshot
>>> ckptio.patch_torch()                              # torch.save/torch.load run ckptio
>>> ckptio.load_into(model, "model.pt")               # in place, into existing tensors
>>> state = ckptio.load("llama-dir/")                 # a sharded model directory, one plan
"""

from __future__ import annotations

try:
    from . import _core  # noqa: F401  (fail early with a clear message)
except ImportError as _e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "ckptio's native extension (ckptio._core) is missing or failed to load. Install ckptio "
        "with `pip install .` from a source checkout (it needs a C++17 compiler and CMake), or "
        f"install a wheel for this platform. Original error: {_e}"
    ) from _e

from typing import Any

from ._async import SaveFuture, async_save, wait_all
from ._load_into import IncompatibleKeys, load_into
from ._open import CheckpointHandle, DirectoryHandle, TensorInfo, TensorSlice, open, rank_slice
from ._verify import UnverifiedWarning
from .errors import CheckpointError, UnsafeGlobalError
from .patch import is_torch_patched, patch_torch, patched_torch, unpatch_torch
from .serialization import load, save
from .settings import Options, get_options, options, set_options

__version__ = "0.1.0"  # the one place: pyproject.toml reads it from here

__all__ = [
    "CheckpointError",
    "CheckpointHandle",
    "DirectoryHandle",
    "IncompatibleKeys",
    "Options",
    "SaveFuture",
    "UnsafeGlobalError",
    "UnverifiedWarning",
    "async_save",
    "dcp",
    "get_options",
    "is_torch_patched",
    "load",
    "open",
    "load_into",
    "options",
    "patch_torch",
    "patched_torch",
    "rank_slice",
    "save",
    "set_options",
    "TensorInfo",
    "TensorSlice",
    "unpatch_torch",
    "wait_all",
]


def __getattr__(name: str) -> Any:
    # ckptio.dcp imports torch.distributed.checkpoint (slow): only when first used.
    if name == "dcp":
        import importlib

        return importlib.import_module(".dcp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
