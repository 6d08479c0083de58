"""weightlift: load safetensors checkpoints as fast as the storage delivers.

The loading half of the ``safetensors`` Python API, backed by weightlift's parallel loader:

    from weightlift import safe_open, load_file, load, load_checkpoint

    with safe_open("model.safetensors", framework="np") as f:
        for name in f.keys():
            array = f.get_tensor(name)
        part = f.get_slice("embedding")[:, :512]

    state = load_checkpoint("model_dir/", threads=8)        # sharded, all in parallel

Arrays share the loader's memory (no copy); the memory lives as long as any array using
it. numpy has no bfloat16 or float8: those load as ``ml_dtypes`` arrays when that package
is installed, and go to torch (``framework="pt"``) through DLPack with their own dtype.
``from weightlift.numpy import load_file`` and ``from weightlift.torch import load_file``
mirror ``safetensors.numpy`` and ``safetensors.torch``.
"""

import os as _os

from ._native import Checkpoint as _Checkpoint
from ._native import SafetensorError, __version__
from ._native import load_bytes as _load_bytes

__all__ = [
    "SafetensorError",
    "safe_open",
    "load_file",
    "load",
    "load_checkpoint",
    "__version__",
]

# Dtypes numpy has, by safetensors code.
_NUMPY_DTYPES = {
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
_ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

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


def _numpy_dtype(code):
    import numpy as np

    if code in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[code])
    if code in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise SafetensorError(
                f"{code} has no numpy dtype: install ml_dtypes, or open with framework='pt'"
            ) from None
        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
    raise SafetensorError(f"{code} tensors cannot be represented in numpy")


def _to_numpy(t):
    """A numpy array over the tensor's memory (no copy)."""
    import numpy as np

    if t.device != "cpu":
        raise SafetensorError(f"tensor {t.name} is on {t.device}: numpy arrays live on the cpu")
    flat = np.asarray(t)  # uint8 over the loader's memory; keeps `t` alive
    return flat.view(_numpy_dtype(t.dtype)).reshape(t.shape)


def _to_torch(t, device="cpu"):
    """A torch tensor over the tensor's memory through DLPack (no copy)."""
    import torch

    out = torch.from_dlpack(t)
    device = _device_name(device)
    if device != "cpu" and str(out.device) != device:
        out = out.to(device)
    return out


def _convert(t, framework, device="cpu"):
    if framework == "pt":
        return _to_torch(t, device)
    if _device_name(device) != "cpu":
        raise SafetensorError("numpy arrays live on the cpu: use device='cpu'")
    return _to_numpy(t)


class PySafeSlice:
    """A tensor not read yet: index it (``[...]``, ``[:, 0:8]``, ``[3]``) to read only that
    part, like safetensors' slices."""

    def __init__(self, handle, name, framework, device):
        self._handle = handle
        self._name = name
        self._framework = framework
        self._device = device
        self._dtype, self._shape = handle.info(name)

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._dtype

    def __getitem__(self, index):
        from ._slicing import plan

        ranges, steps, squeeze = plan(index, self._shape, self._name)
        t = self._handle.get(self._name, ranges)
        out = _convert(t, self._framework, self._device)
        if any(step != 1 for step in steps):
            out = out[tuple(slice(None, None, step) for step in steps)]
        if squeeze:
            out = out.reshape([d for i, d in enumerate(out.shape) if i not in squeeze])
        return out


class safe_open:
    """Opens a safetensors file (or, beyond safetensors, a sharded checkpoint directory,
    an index file or an http(s):// / s3:// URL) for lazy access.

    ``framework``: "np"/"numpy" or "pt"/"torch". ``device``: "cpu" (numpy), or any torch
    device for "pt". ``backend``: "auto" (default), "pread", "direct" or "mmap" (files must
    not change while open). ``token``: bearer token for http(s) URLs (e.g. a hub token).
    """

    def __init__(self, filename, framework, device="cpu", backend="auto", token=None):
        self._framework = _framework(framework)
        self._device = _device_name(device)
        if self._framework == "np" and self._device != "cpu":
            raise SafetensorError(f"device {device} is invalid for numpy: use 'cpu'")
        self._handle = _Checkpoint(_os.fspath(filename), backend=backend, token=token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        """Tensor names, sorted."""
        return self._handle.keys()

    def offset_keys(self):
        """Tensor names in file order."""
        return self._handle.offset_keys()

    def metadata(self):
        """The ``__metadata__`` of the header (a dict of strings), or None."""
        return self._handle.metadata()

    def get_tensor(self, name):
        """The whole tensor."""
        return _convert(self._handle.get(name), self._framework, self._device)

    def get_slice(self, name):
        """A :class:`PySafeSlice` to index into."""
        return PySafeSlice(self._handle, name, self._framework, self._device)

    def get_tensors(self):
        """Every tensor, loaded in parallel, as a dict in file order."""
        return _load_dict(self._handle, self._framework, self._device, None)


def _numpy_groups(groups):
    """{name: array} from `[(memory, [(name, dtype, shape, offset)])]`: one uint8 array per
    allocation, then one view per tensor (each keeps the allocation alive)."""
    import numpy as np

    out = {}
    dtypes = {}
    for memory, entries in groups:
        base = np.asarray(memory)
        for name, code, shape, offset in entries:
            dtype = dtypes.get(code)
            if dtype is None:
                dtype = dtypes[code] = _numpy_dtype(code)
            out[name] = np.ndarray(shape, dtype, buffer=base, offset=offset)
    return out


def _load_dict(handle, framework, device, threads, prefix=None):
    device = _device_name(device)
    if framework == "np":
        if device != "cpu":
            raise SafetensorError("numpy arrays live on the cpu: use device='cpu'")
        return _numpy_groups(handle.load_host(threads=threads, prefix=prefix))
    # Tensors go to a GPU directly when torch will hold them there.
    native_device = device if device.startswith("cuda") else "cpu"
    tensors = handle.load(device=native_device, threads=threads, prefix=prefix)
    return {t.name: _convert(t, framework, device) for t in tensors}


def load_file(filename, device="cpu", framework="np", backend="auto"):
    """Loads every tensor of a safetensors file, in parallel: {name: array}."""
    handle = _Checkpoint(_os.fspath(filename), backend=backend)
    return _load_dict(handle, _framework(framework), device, None)


def load(data, framework="np"):
    """Loads a safetensors file held in ``bytes``: {name: array} (a copy of the data)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load() takes bytes, not {type(data).__name__}")
    fw = _framework(framework)
    if fw == "np":
        return _numpy_groups(_load_bytes(bytes(data), group=True))
    return {t.name: _convert(t, fw) for t in _load_bytes(bytes(data))}


def load_checkpoint(
    path, device="cpu", backend="auto", threads=None, framework="np", prefix=None, token=None
):
    """Loads a whole checkpoint with the parallel loader: one file, a directory of shards
    (with or without ``model.safetensors.index.json``), an index file, or a URL.

    ``device``: "cpu", or "cuda:N" with ``framework="pt"`` (loaded straight to the GPU).
    ``threads``: loader threads (default: CPUs, at least 4). ``prefix``: load only tensors
    whose names start with it. ``token``: bearer token for http(s) URLs. The GIL is
    released while loading.
    """
    handle = _Checkpoint(_os.fspath(path), backend=backend, token=token)
    return _load_dict(handle, _framework(framework), device, threads, prefix)
