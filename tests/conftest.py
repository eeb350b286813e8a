"""Shared builders and checks for the ckptio test suite.

Everything here is deterministic: models are initialised from a fixed seed inside a forked RNG,
so building one never disturbs the global RNG of the test that asked for it.

Helpers (import them with ``from conftest import ...``):

* :func:`make_model`, :func:`model_input`, :func:`train` - a tiny GPT-like model with a tied
  embedding / lm_head, LayerNorms, Linears and a buffer, plus a fixed batch and a train loop.
* :func:`assert_same` - recursive structural and bitwise comparison (types, dtypes, shapes,
  strides, storage offsets, requires_grad, Parameter-ness, ``_metadata``...).
* :func:`assert_same_sharing` - storage sharing and object identity are partitioned alike.
* :func:`zip_records` - the records of a zip archive with their header and payload offsets.
* :func:`write_plain_zip` - a torch archive written by Python's zipfile (independent of ckptio),
  used to craft hostile or unusual files.
* :func:`shift_payload` - a ckptio archive with one record's local header no writer would
  write (a valid file whose payload offset is not the predicted one).

Fixtures for the object-storage tests: ``moto`` (an S3 server on loopback for the test module,
its ``BUCKET`` made) and ``http_server`` (a range-serving HTTP server), both from
``_remote_servers``.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import fractions
import io
import math
import pickle
import struct
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

import ckptio

# ------------------------------------------------------------------------ the installed torch
# The suite runs against every torch the package supports (make test-compat). Where torch's own
# behaviour differs between versions, the tests ask the installed torch, which stays the oracle.


def _torch_load_defaults_to_weights_only() -> bool:
    """torch >= 2.6 loads weights-only when weights_only is not given; torch 2.5 unpickles
    anything (and warns). Asked of torch itself with a global outside its allowlist."""
    buf = io.BytesIO()
    torch.save(fractions.Fraction(1, 3), buf)
    buf.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.load(buf)
        except pickle.UnpicklingError:
            return True
    return False


TORCH_LOAD_DEFAULTS_TO_WEIGHTS_ONLY = _torch_load_defaults_to_weights_only()


def torch_can_save(dtype: torch.dtype) -> bool:
    """Whether the installed torch.save writes a tensor of `dtype` (torch 2.5 cannot save
    uint16, uint32 or uint64: its storage table has no entry for them)."""
    try:
        torch.save(torch.zeros(1, dtype=dtype), io.BytesIO())
    except (KeyError, RuntimeError, TypeError):
        return False
    return True


# A dtype that torch.save pickles through torch._utils._rebuild_tensor_v3 (one of
# torch.storage._new_dtypes()) and that the installed torch can save: uint16 where it can
# (torch 2.5 cannot), float8_e4m3fn otherwise.
V3_DTYPE = (
    torch.uint16
    if torch.uint16 in torch.storage._new_dtypes() and torch_can_save(torch.uint16)
    else torch.float8_e4m3fn
)


def skip_unless_torch_saves(*dtypes: torch.dtype) -> pytest.MarkDecorator:
    """Skips a test (or a parameter: ``pytest.param(dtype, marks=...)``) that needs the installed
    torch.save to write every one of `dtypes`."""
    missing = [str(d) for d in dtypes if not torch_can_save(d)]
    return pytest.mark.skipif(
        bool(missing), reason=f"torch {torch.__version__} cannot save {', '.join(missing)}"
    )


def pytest_configure(config: pytest.Config) -> None:
    if not TORCH_LOAD_DEFAULTS_TO_WEIGHTS_ONLY:
        # The tests' own torch.load(f) calls (the oracle, with torch's default) warn on such a
        # torch. Only those: a warning from a torch.load that ckptio calls still fails the test.
        config.addinivalue_line(
            "filterwarnings",
            "ignore:You are using `torch.load` with `weights_only=False`:FutureWarning:"
            "(test_|conftest|_dcp_worker|_crash_worker)",
        )


# --------------------------------------------------------------------------------- the model
VOCAB = 32
WIDTH = 16
BLOCK = 8


class TinyGPT(nn.Module):
    """One causal self-attention block; lm_head.weight is tied to the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, WIDTH)
        self.pos_emb = nn.Embedding(BLOCK, WIDTH)
        self.ln1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self.register_buffer("mask", torch.tril(torch.ones(BLOCK, BLOCK, dtype=torch.bool)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t))
        q, k, v = self.qkv(self.ln1(x)).split(WIDTH, dim=-1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(WIDTH)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.mlp(self.ln2(x))
        return self.lm_head(self.ln_f(x))


def make_model(seed: int = 0, cls: type[nn.Module] = TinyGPT) -> nn.Module:
    """A freshly initialised model; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls()


def model_input(seed: int = 1, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (tokens, next-token targets) batch."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, BLOCK + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> float:
    """`steps` optimizer steps on fixed batches; returns the last loss."""
    loss = torch.tensor(float("nan"))
    for i in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, model_input(seed + i))
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def trained_optimizer(kind: str, steps: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    if kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-2, weight_decay=0.1
        )
    elif kind == "sgd-momentum":
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    else:  # pragma: no cover - a typo in a test
        raise ValueError(kind)
    train(model, opt, steps)
    return model, opt


# ----------------------------------------------------------------------------- comparisons
def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as raw bytes (bitwise, so NaN payloads and -0.0 compare exactly)."""
    t = t.detach().resolve_conj().resolve_neg()
    # A fresh tensor has canonical strides (contiguous() may keep odd strides of size-1 dims).
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
    return flat.view(torch.uint8)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes: torch.equal, for every dtype (torch 2.5 has no equal
    kernel for float8)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(_tensor_bytes(a), _tensor_bytes(b))
    )


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def assert_tensor_same(
    a: torch.Tensor, b: torch.Tensor, where: str = "tensor", *, values: bool = True
) -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.stride() == b.stride(), f"{where}: stride {a.stride()} != {b.stride()}"
    assert a.storage_offset() == b.storage_offset(), (
        f"{where}: storage_offset {a.storage_offset()} != {b.storage_offset()}"
    )
    assert a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
    assert a.is_conj() == b.is_conj(), f"{where}: conj bit differs"
    assert a.is_neg() == b.is_neg(), f"{where}: neg bit differs"
    assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), (
        f"{where}: storage size {a.untyped_storage().nbytes()} != {b.untyped_storage().nbytes()}"
    )
    if not values:
        return
    assert a.device == b.device, f"{where}: device {a.device} != {b.device}"
    if a.dtype.is_floating_point and a.numel() and a.dtype.itemsize > 1:
        # NaN-aware value check first: a clearer message than a byte diff.
        nan_a, nan_b = torch.isnan(a.detach().float()), torch.isnan(b.detach().float())
        assert torch.equal(nan_a, nan_b), f"{where}: NaN positions differ"
    assert torch.equal(_tensor_bytes(a), _tensor_bytes(b)), f"{where}: values differ"


def assert_same(a: Any, b: Any, where: str = "obj", *, values: bool = True) -> None:
    """Recursively asserts that `b` is a faithful copy of `a`.

    Containers must have the same exact type, keys (in order) and length; an OrderedDict's
    ``_metadata`` attribute (state_dict) must match too. Tensors must match in type (Tensor or
    Parameter), dtype, shape, stride, storage offset, requires_grad and, bitwise, values
    (``values=False`` skips values and device, for meta loads).
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: expected a tensor, got {type(b)!r}"
        assert_tensor_same(a, b, where, values=values)
        return
    assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]", values=values)
        meta_a = getattr(a, "_metadata", None)
        meta_b = getattr(b, "_metadata", None)
        assert (meta_a is None) == (meta_b is None), f"{where}: _metadata present in only one"
        if meta_a is not None:
            assert_same(meta_a, meta_b, f"{where}._metadata", values=values)
    elif isinstance(a, (list, tuple)):  # torch.Size is a tuple: same type checked above
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]", values=values)
    elif isinstance(a, float):
        assert _same_float(a, b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert _same_float(a.real, b.real) and _same_float(a.imag, b.imag), f"{where}: {a} != {b}"
    elif isinstance(a, (set, frozenset)):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:  # int, bool, str, bytes, None, torch.dtype, torch.device, plain objects with __eq__
        assert a == b, f"{where}: {a!r} != {b!r}"


def iter_tensors(obj: Any, where: str = "obj") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable through containers, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{where}[{k!r}]")
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            yield from iter_tensors(meta, f"{where}._metadata")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{where}[{i}]")


def _partition(keys: list[Any]) -> list[list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return sorted(groups.values())


def assert_same_sharing(a: Any, b: Any) -> None:
    """The tensors of `a` and `b` (visited in the same order) are grouped alike by storage
    (``untyped_storage().data_ptr()``) and by object identity (``id``).

    Storages of zero bytes are left out of the storage grouping: they own no memory, so torch
    itself does not keep them shared (an mmap load may even give them distinct addresses).
    """
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    assert [p for p, _ in ta] == [p for p, _ in tb], "the objects hold tensors at different places"
    paths = [p for p, _ in ta]

    def named(groups: list[list[int]]) -> list[list[str]]:
        return [[paths[i] for i in g] for g in groups if len(g) > 1]

    ids_a = _partition([id(t) for _, t in ta])
    ids_b = _partition([id(t) for _, t in tb])
    assert named(ids_a) == named(ids_b), "object identity differs (the same tensor object twice)"

    def storage_keys(ts: list[tuple[str, torch.Tensor]]) -> list[Any]:
        keys: list[Any] = []
        for i, (_, t) in enumerate(ts):
            s = t.untyped_storage()
            keys.append(("ptr", s.data_ptr()) if s.nbytes() else ("empty", i))
        return keys

    st_a = _partition(storage_keys(ta))
    st_b = _partition(storage_keys(tb))
    assert named(st_a) == named(st_b), "storage sharing differs"


# ------------------------------------------------------------------------------ zip helpers
@dataclasses.dataclass(frozen=True)
class ZipRecord:
    name: str  # full name, archive prefix included
    header_offset: int
    data_offset: int
    size: int
    flags: int


def zip_records(path_or_bytes: Path | str | bytes) -> list[ZipRecord]:
    """The entries of a zip archive in central-directory order, with payload offsets computed
    from each local header (name and extra field lengths)."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    import io

    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            hdr = data[info.header_offset : info.header_offset + 30]
            sig, _ver, flags, method = struct.unpack_from("<IHHH", hdr)
            assert sig == 0x04034B50, f"{info.filename}: no local header at {info.header_offset}"
            assert method == 0, f"{info.filename}: compressed"
            name_len, extra_len = struct.unpack_from("<HH", hdr, 26)
            out.append(
                ZipRecord(
                    info.filename,
                    info.header_offset,
                    info.header_offset + 30 + name_len + extra_len,
                    info.file_size,
                    flags,
                )
            )
    return out


def write_plain_zip(target: Any, records: dict[str, bytes], archive: str = "archive") -> None:
    """A torch archive written by Python's zipfile (stored, no padding). torch.load accepts
    these (docs/format.md, "Bytes of each record"); they are the way to craft unusual files
    without ckptio."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, payload in records.items():
            zf.writestr(f"{archive}/{name}", payload)


def shift_payload(data: bytes, name: str, by: int) -> bytes:
    """`data` (a ckptio archive) with record `name`'s local extra field `by` bytes shorter,
    its payload moved up as much, `by` zero bytes after it: every header at the same offset,
    a valid archive, one local header no writer would write."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    h = info.header_offset
    n, m = struct.unpack_from("<HH", data, h + 26)
    extra_at = h + 30 + n
    assert data[extra_at : extra_at + 2] == b"FB"
    (pad,) = struct.unpack_from("<H", data, extra_at + 2)
    assert m == 4 + pad and pad >= by
    start, size = extra_at + m, info.compress_size
    header = bytearray(data[h:extra_at])
    struct.pack_into("<H", header, 28, m - by)
    extra = b"FB" + struct.pack("<H", pad - by) + b"Z" * (pad - by)
    moved = bytes(header) + extra + data[start : start + size] + bytes(by)
    return data[:h] + moved + data[start + size :]


def torch_archive_parts(obj: Any) -> tuple[bytes, list[bytes]]:
    """(data.pkl, [data/0, data/1, ...]) of ``torch.save(obj)``, read back with zipfile."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        names = zf.namelist()
        prefix = names[0].split("/", 1)[0] + "/"
        pkl = zf.read(prefix + "data.pkl")
        n = sum(1 for n in names if n.startswith(prefix + "data/"))
        payloads = [zf.read(f"{prefix}data/{k}") for k in range(n)]
    return pkl, payloads


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moto(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A moto S3 server on loopback for the test module, with the module's ``BUCKET`` made."""
    from _remote_servers import MotoS3

    with MotoS3() as server:
        server.client.create_bucket(Bucket=request.module.BUCKET)
        yield server


@pytest.fixture(scope="module")
def http_server() -> Iterator[Any]:
    """An HTTP server on loopback that serves byte ranges of the objects it is given."""
    from _remote_servers import RangeServer

    with RangeServer() as server:
        yield server


@pytest.fixture
def restore_options() -> Iterator[None]:
    """Restores ckptio's process-wide options after a test that calls set_options."""
    saved = ckptio.get_options()
    try:
        yield
    finally:
        ckptio.set_options(**dataclasses.asdict(saved))


@pytest.fixture
def state_dict() -> collections.OrderedDict:
    return make_model().state_dict()


def assert_releases_gil(call: Callable[[], object], attempts: int = 10) -> None:
    """Asserts that Python threads run while `call` (one native call) is in progress.

    A ticker thread stamps the time in a loop that needs the GIL. Were the GIL held by the
    call, the ticker could run only at the call's edges (one switch interval each), so a stamp
    in the middle half of the call proves the GIL was released. A busy machine may not
    schedule the ticker during one call, so the call is tried up to `attempts` times and one
    proof suffices; with the GIL held no attempt can pass.
    """
    stamps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    t = threading.Thread(target=ticker)
    t.start()
    spans: list[tuple[float, float]] = []
    try:
        time.sleep(0.01)
        for _ in range(attempts):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            spans.append((t0, t1))
            quarter = (t1 - t0) / 4
            i = bisect.bisect_right(stamps, t0 + quarter)  # stamps only grow
            if i < len(stamps) and stamps[i] < t1 - quarter:
                return
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    durations = ", ".join(f"{b - a:.3f}" for a, b in spans)
    raise AssertionError(
        f"no Python code ran during the middle half of native calls ({durations} s)"
    )


@pytest.fixture
def cpu_ring(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The CPU stands in for a staged device (CUDA on a GPU host): ``_staging.copier_for``
    makes a host-to-host TorchCopier for any device, so loads and saves take their pinned-ring
    paths here. Returns the copiers made (``allocated`` counts the ring's slots)."""
    from ckptio import _staging

    made: list[Any] = []

    def copier_for(device: torch.device) -> Any:
        made.append(_staging.TorchCopier(device))
        return made[-1]

    monkeypatch.setattr(_staging, "copier_for", copier_for)
    return made


@pytest.fixture()
def staged_cpu(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """map_location "cpu" takes the staged-device path (CUDA's on a GPU host): the CPU
    stands in for the device, with a ring of host buffers. Returns the copiers made."""
    from ckptio import _staging

    copiers: list[Any] = []

    def copier() -> Any:
        copiers.append(_staging.TorchCopier(torch.device("cpu")))
        return copiers[-1]

    def target(location: str) -> Any:
        return _staging.DeviceTarget(torch.device("cpu"), copier) if location == "cpu" else None

    monkeypatch.setattr(_staging, "staging_target", target)
    return copiers
