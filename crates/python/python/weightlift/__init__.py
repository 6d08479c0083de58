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

from ._handle import StateDict
from ._load import load, load_checkpoint, load_file
from ._native import (
    Cancelled,
    DoesNotFit,
    InvalidPlacement,
    SafetensorError,
    __version__,
    memory_budget,
)
from ._open import safe_open
from ._place import load_into
from .patch import patch, patched, unpatch

__all__ = [
    "SafetensorError",
    "DoesNotFit",
    "Cancelled",
    "InvalidPlacement",
    "StateDict",
    "safe_open",
    "load_file",
    "load",
    "load_checkpoint",
    "load_into",
    "memory_budget",
    "patch",
    "patched",
    "unpatch",
    "__version__",
]
