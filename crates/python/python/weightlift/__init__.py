"""weightlift: load safetensors checkpoints as fast as the storage delivers.

The loading half of the ``safetensors`` Python API, backed by weightlift's parallel loader:

    from weightlift import safe_open, load_file, load, load_checkpoint

    with safe_open("model.safetensors", framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
        part = f.get_slice("embedding")[:, :512]

    state = load_checkpoint("model_dir/", framework="pt")   # sharded, all in parallel

Tensors share the loader's memory (no copy); the memory lives as long as any tensor uses it.

**Where CPU tensors live.** On a local disk or in memory (tmpfs), tensors are views of
private (copy-on-write) mappings of the files, populated up front in parallel: no copy, no
second copy of the model in the page cache, writable (writes never reach the file). That is
the contract ``safetensors`` loads already have: the files must not be truncated or rewritten
while their tensors live. On network and FUSE filesystems, for URLs, and with ``copy=True``
or ``backend="pread"``/``"direct"``, tensors are read into memory of their own instead, and
the files may change freely afterwards. ``load_checkpoint(...).report`` says which, per file,
and why.

numpy has no bfloat16 or float8: those load as ``ml_dtypes`` arrays when that package is
installed, and go to torch (``framework="pt"``) with their own dtype.
``from weightlift.numpy import load_file`` and ``from weightlift.torch import load_file``
mirror ``safetensors.numpy`` and ``safetensors.torch``.
"""

import gc as _gc
import os as _os

from . import _arrays
from ._native import Checkpoint as _Checkpoint
from ._native import SafetensorError, __version__
from ._native import load_bytes as _load_bytes
from ._open import _open_handle, _safe_open_handle, safe_open

__all__ = [
    "SafetensorError",
    "StateDict",
    "safe_open",
    "load_file",
    "load",
    "load_checkpoint",
    "patch",
    "patched",
    "unpatch",
    "__version__",
]

_FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt", "pytorch": "pt"}


def _framework(name):
    fw = _FRAMEWORKS.get(str(name).lower())
    if fw is None:
        raise SafetensorError(
            f"framework {name} is not supported by weightlift (use 'np' or 'pt')"
        )
    return fw


def _device_name(device):
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device) if device is not None else "cpu"


class StateDict(dict):
    """A ``dict`` of name to tensor, with ``report``: one dict per file with ``file``,
    ``placement`` ("mapped", "owned", "device"), ``reason`` and ``bytes_read``."""

    report = ()


def _slice_plans(handle, slices):
    """{name: ranges} for the native load and {name: (steps, squeeze)} for the views, from
    ``slices(name, shape)`` (an index as ``get_slice`` takes, or None)."""
    from ._slicing import plain_ranges, plan

    ranges, after = {}, {}
    # Tens of thousands of small tuples: the collector would otherwise walk every live object
    # (a model already loaded, say) several times over while they are made.
    enabled = _gc.isenabled()
    _gc.disable()
    try:
        _plan_each(handle, slices, ranges, after, plain_ranges, plan)
    finally:
        if enabled:
            _gc.enable()
    return ranges, after


def _plan_each(handle, slices, ranges, after, plain_ranges, plan):
    for name, shape in handle.shapes():
        index = slices(name, list(shape))
        if index is None:
            continue
        r = plain_ranges(index, shape)
        if r is not None:
            ranges[name] = r
            continue
        try:
            r, steps, squeeze = plan(index, shape, name)
        except SafetensorError as e:
            raise SafetensorError(f"slices for tensor {name!r}: {e}") from None
        ranges[name] = r
        if squeeze or any(step != 1 for step in steps):
            after[name] = (steps, squeeze)


def _finish_slices(out, after):
    for name, (steps, squeeze) in after.items():
        t = out[name]
        if any(step != 1 for step in steps):
            t = t[tuple(slice(None, None, step) for step in steps)]
        if squeeze:
            t = t.reshape([d for i, d in enumerate(t.shape) if i not in squeeze])
        out[name] = t


def _load_dict(handle, framework, device, threads=None, prefix=None, drop_cache=False, slices=None):
    device = _device_name(device)
    if framework == "np" and device != "cpu":
        raise SafetensorError("numpy arrays live on the cpu: use device='cpu'")
    # Tensors go to a GPU directly when torch will hold them there.
    native_device = device if device.startswith("cuda") else "cpu"
    ranges, after = _slice_plans(handle, slices) if slices is not None else (None, {})
    groups, report = handle.load(
        device=native_device,
        threads=threads,
        prefix=prefix,
        drop_cache=drop_cache,
        layout=framework,
        slices=ranges,
    )
    out = StateDict()
    out.report = report
    if framework == "np":
        _arrays.numpy_groups(groups, out)
    else:
        _arrays.torch_groups(groups, out)
    _finish_slices(out, after)
    if native_device != device:
        for name, t in out.items():
            out[name] = t.to(device)
    return out


def load_file(filename, device="cpu", framework="np", backend="auto", copy=False):
    """Loads every tensor of a safetensors file, in parallel: {name: array}. See the module
    docs for where the tensors live (``copy=True`` for memory of their own)."""
    handle = _open_handle(filename, backend, copy)
    return _load_dict(handle, _framework(framework), device)


def load(data, framework="np"):
    """Loads a safetensors file held in ``bytes``: {name: array} (a copy of the data)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load() takes bytes, not {type(data).__name__}")
    fw = _framework(framework)
    groups = _load_bytes(bytes(data), layout=fw)
    if fw == "np":
        return _arrays.numpy_groups(groups, {})
    return _arrays.torch_groups(groups, {})


def load_checkpoint(
    path,
    device="cpu",
    backend="auto",
    threads=None,
    framework="np",
    prefix=None,
    token=None,
    copy=False,
    drop_cache=False,
    group=None,
    slices=None,
):
    """Loads a whole checkpoint with the parallel loader: one file, a directory of shards
    (with or without ``model.safetensors.index.json``), an index file, a URL or a model id.
    Returns a :class:`StateDict` (a ``dict`` with a ``report``).

    ``device``: "cpu", or "cuda:N" with ``framework="pt"`` (loaded straight to the GPU).
    ``threads``: loader threads (default: CPUs, at least 4). ``prefix``: load only tensors
    whose names start with it. ``token``: bearer token for http(s) URLs. ``copy``: read
    into memory of its own even where mapping is possible (see the module docs).
    ``drop_cache``: after reading into memory of its own, drop the bytes read from the page
    cache, so it does not hold a second copy of the model. The GIL is released while
    loading.

    ``group``: a ``torch.distributed`` process group (``True`` for the default one) whose
    ranks all call this with the same arguments: each reads a share of the bytes and the shares are exchanged with the
    group's collectives, so the storage is read once, not once per rank (gloo for CPU
    tensors, NCCL with ``device="cuda:N"``). ``slices``: ``fn(name, shape)`` returning the
    index to load of a tensor (as ``get_slice`` takes: ``[rank * n // w:(rank + 1) * n // w]``
    and the like) or None for all of it: one planned load of many tensors' slices.
    ``report`` says, per file, the bytes this rank read. A shared load fails on every rank
    together (``SafetensorError`` naming the rank and why) when any rank cannot load its
    share, asks for a different load, or dies.
    """
    framework = _framework(framework)
    if group is None:
        handle = _open_handle(path, backend, copy, token)
        return _load_dict(handle, framework, device, threads, prefix, drop_cache, slices)

    from ._distributed import load_shared

    device = _device_name(device)
    if framework == "np" and device != "cpu":
        raise SafetensorError("numpy arrays live on the cpu: use device='cpu'")

    def prepare():
        # Inside the shared load, so that a rank that cannot open the checkpoint fails
        # every rank, never leaves them waiting.
        handle = _open_handle(path, backend, True, token)
        ranges, after = _slice_plans(handle, slices) if slices is not None else (None, {})
        return handle, ranges, after

    out = StateDict()
    loaded, out.report, after = load_shared(prepare, framework, device, group, threads, prefix)
    out.update(loaded)
    _finish_slices(out, after)
    return out


# Last: the patch module wraps the functions above.
from .patch import patch, patched, unpatch  # noqa: E402
