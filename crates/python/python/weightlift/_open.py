"""``safe_open``: lazy access to one file or a whole checkpoint, like safetensors'."""

import os
import re

from . import _arrays
from ._native import Checkpoint as _Checkpoint
from ._native import SafetensorError

_URL_SCHEMES = ("http://", "https://", "s3://", "hf://")
# `org/name` or `org/name@revision`: looked up in the Hugging Face cache when no such path
# exists (the native side resolves it).
_MODEL_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*(@[^/\\]+)?")


def _is_url(path):
    return path[:8].lower().startswith(_URL_SCHEMES)


def _mode(backend, copy):
    """(native backend, mapping) for the Python API's ``backend`` and ``copy``.

    "auto" and "mmap" (safetensors' default, which most callers pass without choosing) map
    files where mapping pays (local disks, tmpfs) and read the others into memory of their
    own; "pread" and "direct" always read; ``copy=True`` never maps."""
    backend = str(backend)
    if backend in ("auto", "mmap"):
        if copy:
            return "auto", "never"
        # Files that map never go through the read backend, and those that do not (network
        # filesystems) get pread from the automatic rule anyway: skip the rule's page-cache
        # census (~2 ms per file), which only chooses between pread and O_DIRECT.
        return "pread", "auto"
    return backend, "never"


def _open_handle(path, backend="auto", copy=False, token=None):
    path = os.fspath(path)
    native_backend, mapping = _mode(backend, copy)
    if _is_url(path) and native_backend == "pread" and str(backend) in ("auto", "mmap"):
        native_backend = "auto"  # URLs are read with range requests
    if not _is_url(path) and not os.path.exists(path) and not _MODEL_ID.fullmatch(path):
        # safetensors' wording, which callers match on.
        raise FileNotFoundError(f"No such file or directory: {path}")
    return _Checkpoint(path, backend=native_backend, token=token, mapping=mapping)


def _device_name(device):
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device) if device is not None else "cpu"


_FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt", "pytorch": "pt"}


class PySafeSlice:
    """A tensor not read yet: index it (``[...]``, ``[:, 0:8]``, ``[3]``, ``[()]``) to read
    only that part, like safetensors' slices. Where the file is mapped and the part is
    contiguous (the whole tensor, or rows), the result is a view of the mapping."""

    def __init__(self, owner, name):
        self._owner = owner
        self._name = name
        self._dtype, self._shape = owner._h().info(name)

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._dtype

    def __len__(self):
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __getitem__(self, index):
        from ._slicing import plan

        owner = self._owner
        try:
            ranges, steps, squeeze = plan(index, self._shape, self._name)
        except SafetensorError:
            # For torch over a mapped file, safetensors indexes the whole tensor with
            # torch's own rules (which, unlike its strict parser, accept e.g. `[...]` of an
            # empty tensor or a stop past the end): so do we, on a view of the mapping.
            if owner._framework == "pt":
                whole, mapped = owner._read(self._name, None, to_device=False)
                if mapped:
                    return owner._to_device(whole[index])
            raise
        out, _ = owner._read(self._name, ranges, to_device=False)
        if any(step != 1 for step in steps):
            out = out[tuple(slice(None, None, step) for step in steps)]
        if squeeze:
            out = out.reshape([d for i, d in enumerate(out.shape) if i not in squeeze])
        return owner._to_device(out)


class safe_open:
    """Opens a safetensors file (or, beyond safetensors, a sharded checkpoint directory,
    an index file or an http(s):// / s3:// URL) for lazy access.

    ``framework``: "np"/"numpy" or "pt"/"torch". ``device``: "cpu" (numpy), or any torch
    device for "pt". ``backend``: "auto" (default) or "mmap": tensors are views of a private
    mapping of files on local disks and in memory, read into memory of their own elsewhere;
    "pread" or "direct": always read (see the package docs for the mapping contract).
    ``token``: bearer token for http(s) URLs (e.g. a hub token). ``prefetch``: start loading
    every tensor in the background right away (mapped files are populated, others read),
    for callers that will read all of them (``weightlift.patch()`` turns it on for the
    libraries it patches); closing the handle calls it off.
    """

    def __init__(
        self, filename, framework, device="cpu", backend="auto", token=None, prefetch=False
    ):
        fw = _FRAMEWORKS.get(str(framework).lower())
        if fw is None:
            raise SafetensorError(
                f"framework {framework} is not supported by weightlift (use 'np' or 'pt')"
            )
        self._framework = fw
        self._device = _device_name(device)
        if fw == "np" and self._device != "cpu":
            raise SafetensorError(f"device {device} is invalid for numpy: use 'cpu'")
        self._handle = _open_handle(filename, backend, token=token)
        self._bases = _arrays.TorchBases()
        if prefetch and self._device == "cpu":
            # Callers that prefetch open every shard of a checkpoint one after the other, so
            # the shards' loads run side by side: two threads each keep a disk queue full
            # without crowding the caller's own threads.
            self._handle.prefetch(threads=int(os.environ.get("WEIGHTLIFT_PREFETCH_THREADS", "2")))

    def _h(self):
        if self._handle is None:
            raise SafetensorError("File is closed")
        return self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._bases.clear()
        return False

    def keys(self):
        """Tensor names, sorted."""
        return self._h().keys()

    def offset_keys(self):
        """Tensor names in file order."""
        return self._h().offset_keys()

    def metadata(self):
        """The ``__metadata__`` of the header (a dict of strings), or None."""
        return self._h().metadata()

    def _read(self, name, ranges=None, to_device=True):
        """The tensor (or block), and whether it lives in a mapping of the file."""
        memory, entry = self._h().get(name, ranges, layout=self._framework)
        mapped = getattr(memory, "mapped", False)
        if self._framework == "np":
            import numpy as np

            _, code, shape, offset = entry
            out = np.ndarray(
                shape, _arrays.numpy_dtype(code), buffer=np.asarray(memory), offset=offset
            )
            return out, mapped
        _, base, typed = self._bases.base(memory)
        out = _arrays.torch_view(base, typed, entry)
        return (self._to_device(out) if to_device else out), mapped

    def _to_device(self, tensor):
        if self._device != "cpu":
            return tensor.to(self._device)
        return tensor

    def get_tensor(self, name):
        """The whole tensor."""
        return self._read(name)[0]

    def get_slice(self, name):
        """A :class:`PySafeSlice` to index into."""
        return PySafeSlice(self, name)

    def get_tensors(self):
        """Every tensor, loaded in parallel, as a dict in file order."""
        from . import _load_dict

        return _load_dict(self._h(), self._framework, self._device)


def _safe_open_handle(f, framework, device="cpu", *, backend="auto"):
    """``safe_open`` of an open file object (its ``name``), as safetensors' handle API."""
    if not hasattr(f, "fileno"):
        raise SafetensorError("expected an open file object with a file descriptor")
    return safe_open(f.name, framework, device, backend=backend)
