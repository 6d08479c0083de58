"""Whole loads: ``load_file``, ``load`` (bytes) and ``load_checkpoint``."""

from . import _args, _handle
from ._native import load_bytes as _load_bytes


def load_file(filename, device="cpu", framework="np", backend="auto", copy=False):
    """Loads every tensor of a safetensors file, in parallel: {name: array}. See the package
    docs for where the tensors live (``copy=True`` for memory of their own)."""
    framework = _args.framework(framework)
    device = _args.device(framework, device)
    handle = _handle.open_handle(filename, backend, copy)
    return _handle.load_dict(handle, framework, device)


def load(data, framework="np"):
    """Loads a safetensors file held in ``bytes``: {name: array} (a copy of the data)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load() takes bytes, not {type(data).__name__}")
    framework = _args.framework(framework)
    groups = _load_bytes(bytes(data), layout=_args.layout(framework))
    return _handle.arrays(groups, framework, {})


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
    into memory of its own even where mapping is possible (see the package docs).
    ``drop_cache``: after reading into memory of its own, drop the bytes read from the page
    cache, so it does not hold a second copy of the model (with ``group=``, once every rank
    is done). The GIL is released while loading.

    Memory: a load into memory of its own must fit the memory budget (default: the memory
    available to the process, container limits included; ``WEIGHTLIFT_MEMORY_BUDGET``), or it
    fails before reading anything, naming the bytes needed and available. A mapped load
    populates at most the prefetch window up front (``WEIGHTLIFT_PREFETCH_WINDOW``, default
    half the budget); the rest is read on first touch.

    ``group``: a ``torch.distributed`` process group (``True`` for the default one) whose
    ranks all call this with the same arguments: each reads a share of the bytes and the
    shares are exchanged with the group's collectives, so the storage is read once, not once
    per rank (gloo for CPU tensors, NCCL with ``device="cuda:N"``). ``slices``:
    ``fn(name, shape)`` returning the index to load of a tensor (as ``get_slice`` takes:
    ``[rank * n // w:(rank + 1) * n // w]`` and the like) or None for all of it: one planned
    load of many tensors' slices. ``report`` says, per file, the bytes this rank read. A
    shared load fails on every rank together (``SafetensorError`` naming the rank and why)
    when any rank cannot load its share, asks for a different load, or dies.
    """
    framework = _args.framework(framework)
    device = _args.device(framework, device)
    if group is None:
        handle = _handle.open_handle(path, backend, copy, token)
        return _handle.load_dict(handle, framework, device, threads, prefix, drop_cache, slices)

    from ._distributed import load_shared

    return load_shared(
        path, framework, device, group, backend, token, threads, prefix, slices, drop_cache
    )
