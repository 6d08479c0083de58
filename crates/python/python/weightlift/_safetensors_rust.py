"""A stand-in for safetensors' native module, ``safetensors._safetensors_rust``.

``weightlift.patch()`` (and anyone who installs this module as
``sys.modules["safetensors._safetensors_rust"]`` before safetensors' Python modules bind its
names) makes safetensors' own ``safe_open``, ``safetensors.torch.load_file`` and
``safetensors.numpy.load_file`` load through weightlift. Loading is weightlift's;
serialization (``serialize``, ``serialize_file``, ``TensorSpec``) stays safetensors' own, with
its errors raised as this module's ``SafetensorError``.
"""

import functools
import importlib.machinery
import importlib.util
import sys

from ._native import SafetensorError
from ._native import byte_len as _byte_len
from ._native import load_bytes as _load_bytes
from ._open import _safe_open_handle, safe_open

__all__ = [
    "SafetensorError",
    "TensorSpec",
    "__version__",
    "deserialize",
    "safe_open",
    "_safe_open_handle",
    "serialize",
    "serialize_file",
]


def _real():
    """safetensors' own native module: the one already imported, or loaded from its file
    without importing the ``safetensors`` package (which may be importing this module right
    now). An extension module can be initialised once per process, so an imported one is
    reused, never loaded again."""
    name = "safetensors._safetensors_rust"
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", "").endswith((".so", ".pyd")):
        return mod
    package = importlib.util.find_spec("safetensors")
    if package is None or not package.submodule_search_locations:
        raise ImportError("weightlift stands in for safetensors' native module: install safetensors")
    spec = importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations)
    if spec is None:
        raise ImportError("safetensors' native module was not found")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    return real


_native_st = _real()
__version__ = _native_st.__version__


def _ours(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _native_st.SafetensorError as e:
            raise SafetensorError(str(e)) from e

    return call


# Made only through its constructor (nothing checks `isinstance`): wrapped like the
# functions, so that an unknown dtype is this module's error too.
TensorSpec = _ours(_native_st.TensorSpec)
serialize = _ours(_native_st.serialize)
serialize_file = _ours(_native_st.serialize_file)


def deserialize(data):
    """``[(name, {"dtype": code, "shape": [...], "data": bytes})]`` in file order, like
    safetensors' ``deserialize``."""
    import numpy as np

    out = []
    for memory, entries in _load_bytes(bytes(data)):
        base = np.asarray(memory)
        for name, code, shape, offset in entries:
            count = 1
            for d in shape:
                count *= d
            nbytes = _byte_len(code, count)
            out.append(
                (name, {"dtype": code, "shape": list(shape), "data": base[offset : offset + nbytes].tobytes()})
            )
    return out
