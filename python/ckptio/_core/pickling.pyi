# Stubs of ckptio._core.pickling (csrc/bindings/register_pickle.cpp, register_unpickle.cpp,
# register_specs.cpp): the pickle pre-scan, and C fast paths of the pickler and unpicklers.
#
# Each fast path does only the common case and hands every other call to its Python twin,
# given to it as `fallback`; a test builds the same objects both ways and compares them:
#
#   fast path             Python twin                               compared in (tests/)
#   StorageSlicer         _unpickler.StorageLoader.persistent_load  test_load_hot_paths.py
#   fast_rebuild_v2       _unpickler's checked rebuild_tensor_v2    test_load_hot_paths.py
#   plan_arena            (a plan, no twin: its slots are checked)  test_load_hot_paths.py
#   spec_persistent_load  _unpickler.SpecLoader.persistent_load     test_load_into_hot_paths.py
#   spec_rebuild_v2       _unpickler's spec rebuild_tensor_v2       test_load_into_hot_paths.py
#   plan_direct_reads     _load_into._match (the pairs it leaves)   test_load_into_hot_paths.py
#   tensor_reducer        _pickler._reduce_plain_tensor             test_pickler_hooks.py
#   storage_ids           _pickler's storage_id                     test_pickler_hooks.py
#   dispatch_by_type      a dict lookup by exact type, or default   test_pickler_hooks.py
from __future__ import annotations

from typing import Any, Callable, Final

from .zip import ArchiveWriter

def dispatch_by_type(
    table: dict[type, Callable[[Any], Any]], default: Any
) -> Callable[[Any], Any]: ...

class StorageSlicer:
    """persistent_load for storages sliced from one base storage (see _unpickler.py)."""

    base: Any  # the storage slices come from; None makes every call fall back
    offsets: dict[str, int] | None  # None: slices start at the record's data offset
    limit: int  # with offsets: records of this many bytes or more fall back
    def __init__(
        self,
        fallback: Callable[[Any], Any],
        records: dict[str, tuple[int, int, int]],
        types: dict[Any, tuple[Any, int]],
        identity: set[str] | frozenset[str],
        loaded: dict[str, Any],
        slice: Callable[[Any, slice], Any],
        typed: type,
    ) -> None: ...
    def __call__(self, saved_id: Any) -> Any: ...

def fast_rebuild_v2(
    fallback: Callable[..., Any],
    typed: type,
    untyped: type,
    make_empty: Callable[[Any], Any],
    set_metadata: Callable[[Any, Any], Any],
    cpu: Any,
) -> Callable[..., Any]: ...
def tensor_reducer(
    fallback: Callable[[Any], Any],
    strided: Any,
    device_flags: tuple[str, ...],
    v3_dtypes: frozenset[Any],
    rebuild_v2: Callable[..., Any],
    typed: type,
    hooks_stand_in: type,
    get_metadata: Callable[[Any], Any],
) -> Callable[[Any], Any]: ...
def storage_ids(
    fallback: Callable[[Any], Any],
    typed: type,
    untyped: type,
    storage_types: dict[Any, tuple[Any, int]],
    locations: dict[Any, str],
    keys: dict[int, str],
    storages: list[Any],
    dtypes: dict[int, Any],
    sink: tuple[ArchiveWriter, int, frozenset[str]] | None = None,
) -> Callable[[Any], Any]: ...
def plan_arena(
    records: dict[str, tuple[int, int, int]], limit: int, alignment: int
) -> tuple[int, dict[str, int], bytes]: ...

class StorageRef(tuple[Any, ...]):
    """A storage of the file, not read (load_into's parse): a named tuple made in C."""

    def __new__(cls, fields: tuple[int, int, Any, int]) -> StorageRef: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def itemsize(self) -> int: ...

class TensorSpec(tuple[Any, ...]):
    """A dense tensor of the file without a torch object (load_into's parse)."""

    def __new__(
        cls, fields: tuple[int, Any, int, tuple[int, ...], tuple[int, ...]]
    ) -> TensorSpec: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def storage_offset(self) -> int: ...
    @property
    def size(self) -> tuple[int, ...]: ...
    @property
    def stride(self) -> tuple[int, ...]: ...

def spec_persistent_load(
    fallback: Callable[[Any], Any],
    records: dict[str, tuple[int, int, int]],
    types: dict[Any, tuple[Any, int]],
    loaded: dict[str, Any],
) -> Callable[[Any], Any]: ...
def spec_rebuild_v2(fallback: Callable[..., Any]) -> Callable[..., Any]: ...
def plan_direct_reads(
    dests: dict[Any, Any], srcs: dict[Any, Any], strided: Any
) -> tuple[bytes, list[Any]]: ...

class PickleScan:
    opcodes: Final[int]
    memo_puts: Final[int]
    memo_size: Final[int]  # the largest memo index stored, plus one (0: none)
    max_depth: Final[int]
    end: Final[int]  # just past STOP (0 when a lenient scan stopped early)
    complete: Final[bool]  # False when a lenient scan stopped at an unknown opcode

def scan_pickle(data: bytes | bytearray | memoryview, weights_only: bool) -> PickleScan: ...
def pickle_globals(
    data: bytes | bytearray | memoryview, weights_only: bool
) -> list[tuple[str, str]]: ...
