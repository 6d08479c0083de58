"""Arrays over the loader's memory: numpy arrays and torch tensors as views, no copies.

The native side hands out tensors grouped by allocation (one per shard: owned memory, a
private mapping of the file, or device memory) with each tensor's dtype, shape and offset.
Here each allocation becomes one array (numpy through ``__array_interface__``, torch through
``torch.from_numpy`` or DLPack for device memory) and each tensor a view of it: about 2 us per
tensor for torch (``as_strided`` with strides computed natively), under 1 us for numpy.
"""

import functools
import gc
import math

from ._native import DeviceMemory, SafetensorError

# Dtypes numpy has, by safetensors code.
NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "U64": "<u8",
    "I32": "<i4",
    "U32": "<u4",
    "I16": "<i2",
    "U16": "<u2",
    "I8": "|i1",
    "U8": "|u1",
    "BOOL": "|b1",
    "C64": "<c8",
}
# Dtypes numpy lacks, by their ml_dtypes name.
ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
# torch's name for each safetensors code (F4 packs two elements per byte; F6 has none).
TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "U64": "uint64",
    "I32": "int32",
    "U32": "uint32",
    "I16": "int16",
    "U16": "uint16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}

_numpy_cache = {}
_torch_cache = {}


def numpy_dtype(code):
    """numpy's dtype for a safetensors code (ml_dtypes' for BF16 and F8, looked up each time:
    whether ml_dtypes is importable can change)."""
    dtype = _numpy_cache.get(code)
    if dtype is not None:
        return dtype
    import numpy as np

    if code in NUMPY_DTYPES:
        dtype = _numpy_cache[code] = np.dtype(NUMPY_DTYPES[code])
    elif code in ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise SafetensorError(
                f"{code} has no numpy dtype: install ml_dtypes, or open with framework='pt'"
            ) from None
        dtype = np.dtype(getattr(ml_dtypes, ML_DTYPES[code]))
    else:
        raise SafetensorError(f"{code} tensors cannot be represented in numpy")
    return dtype


def torch_dtype(code):
    dtype = _torch_cache.get(code)
    if dtype is not None:
        return dtype
    import torch

    dtype = getattr(torch, TORCH_DTYPES.get(code, "-"), None)
    if dtype is None:
        raise SafetensorError(
            f"{code} tensors have no torch dtype (torch {torch.__version__})"
        )
    _torch_cache[code] = dtype
    return dtype


def numpy_groups(groups, out):
    """Adds {name: array} for `[(memory, [(name, code, shape, offset)])]` to `out`: one
    uint8 array per allocation, then one view per tensor (each keeps the allocation alive)."""
    import numpy as np

    ndarray = np.ndarray
    dtypes = {}
    for memory, entries in groups:
        if isinstance(memory, DeviceMemory):
            raise SafetensorError("numpy arrays live on the cpu: use framework='pt' for GPUs")
        base = np.asarray(memory)
        for name, code, shape, offset in entries:
            dtype = dtypes.get(code)
            if dtype is None:
                dtype = dtypes[code] = numpy_dtype(code)
            out[name] = ndarray(shape, dtype, buffer=base, offset=offset)
    return out


class TorchBases:
    """The torch tensor over each shared allocation (a shard's mapping, a shard loaded whole)
    and its typed views, built once per allocation (a handle keeps one of these across
    `get_tensor` calls). One tensor's bytes read into memory of their own are not kept: that
    memory must go with the caller's last reference to the tensor (kept here, a handle that
    reads files it does not map held every tensor it had read until closed: a patched reader
    of a network filesystem was OOM-killed in a memory cgroup smaller than the checkpoint)."""

    def __init__(self):
        self._bases = {}

    def base(self, memory):
        key = getattr(memory, "key", None) if getattr(memory, "shared", True) else None
        found = self._bases.get(key) if key is not None else None
        if found is None:
            found = (memory, torch_base(memory), {})
            if key is not None:
                self._bases[key] = found
        return found

    def clear(self):
        self._bases.clear()


@functools.lru_cache(maxsize=256)
def contiguous_strides(shape):
    """The strides (elements) of a C-contiguous tensor of `shape` (a tuple), as a tuple; cached:
    a checkpoint has few distinct shapes, and callers ask once per tensor."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def torch_base(memory):
    import torch

    if isinstance(memory, DeviceMemory):
        return torch.from_dlpack(memory)
    import numpy as np

    return torch.from_numpy(np.asarray(memory))


def torch_view(base, typed, entry):
    """One tensor of `entry` = (name, code, shape, strides, element offset, byte offset)."""
    _, code, shape, strides, elem, offset = entry
    view = typed.get(code)
    if view is None:
        dtype = torch_dtype(code)
        size = dtype.itemsize
        n = base.numel()
        view = typed[code] = base[: n - n % size].view(dtype).as_strided
    if elem >= 0:
        return view(shape, strides, elem)
    return torch_unaligned(base, offset, torch_dtype(code), shape)


def torch_unaligned(base, offset, dtype, shape):
    """A tensor not aligned to its element size in the file (rare; the format allows it), at
    byte `offset` of the bytes `base`: a copy of its bytes (torch cannot view it)."""
    raw = base[offset : offset + math.prod(shape) * dtype.itemsize].clone()
    return raw.view(dtype).view(shape)


def torch_groups(groups, out):
    """Adds {name: tensor} for `[(memory, [entry])]` (see `torch_view`) to `out`: one torch
    tensor per allocation, then one view per tensor. The garbage collector is paused while
    the views are made: tens of thousands of new objects would otherwise run it over and
    over for nothing (it doubles the cost per tensor). The loop is `torch_view` inlined: a
    Python call per tensor costs a quarter of the budget."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        for memory, entries in groups:
            base = torch_base(memory)
            typed = {}
            for entry in entries:
                name, code, shape, strides, elem, _ = entry
                view = typed.get(code)
                if view is None or elem < 0:
                    out[name] = torch_view(base, typed, entry)
                else:
                    out[name] = view(shape, strides, elem)
    finally:
        if enabled:
            gc.enable()
    return out
