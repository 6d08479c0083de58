"""``safe_open``: lazy access to one file or a whole checkpoint, like safetensors'."""

import threading
import weakref

from . import _args, _arrays, _handle, _slicing
from ._native import SafetensorError

# Early reads of whole checkpoints running now (``from_pretrained``'s, see
# ``weightlift._transformers``): called off when a reader starts (the first read of a handle
# opened to prefetch, or weightlift's own planned loads), which reads the files itself from
# then on; two readers of one file split each other's reads. (hf-dense cold, the plain patch,
# median of 4: 0.62 s with the early read called off at the first read, 1.45 s without;
# stock 0.99 s.) All of them, whichever thread's call they belong to: a hint that only costs
# speed.
_EARLY = set()
_EARLY_LOCK = threading.Lock()


def add_early_read(reader):
    """Registers `reader` (anything with ``close()``) as an early read running now."""
    with _EARLY_LOCK:
        _EARLY.add(reader)


def remove_early_read(reader):
    with _EARLY_LOCK:
        _EARLY.discard(reader)


def stop_early_reads():
    """Calls off every early read running now (see ``_EARLY``)."""
    with _EARLY_LOCK:
        readers = list(_EARLY)
        _EARLY.clear()
    for reader in readers:
        reader.close()


# Handles opened to prefetch whose prefetch has not started (weak references, in the order
# they were opened): the first read of any starts all of them (see `safe_open._start_prefetch`).
_PENDING = []
_PENDING_LOCK = threading.Lock()


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
        owner = self._owner
        if index is Ellipsis:
            # What transformers and vLLM ask of every tensor: the whole of it, without the
            # general parsing (a third of the per-tensor time in Python).
            return owner._read(self._name)[0]
        try:
            ranges, steps, squeeze = _slicing.plan(index, self._shape, self._name)
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
        return owner._to_device(_slicing.finish(out, steps, squeeze))


class safe_open:
    """Opens a safetensors file (or, beyond safetensors, a sharded checkpoint directory,
    an index file, an http(s):// / s3:// / hf:// URL or a model id) for lazy access.

    ``framework``: "np"/"numpy" or "pt"/"torch". ``device``: "cpu" (numpy), or any torch
    device for "pt". ``backend``: "auto" (default) or "mmap": tensors are views of a private
    mapping of files on local disks and in memory, read into memory of their own elsewhere;
    "pread" or "direct": always read (see the package docs for the mapping contract).
    ``token``: bearer token for http(s) URLs (e.g. a hub token). ``prefetch``: from the first
    read on, bring every tensor into memory in the background, for callers that will read all
    of them (``weightlift.patch()`` turns it on for the libraries it patches): through the
    process's prefetch window, in the order the handles were opened and are read (the first
    read of any handle opened this way starts every one opened and not closed yet, as a
    loader opens every file of a model before reading the first), never more than the window
    ahead of the readers (``WEIGHTLIFT_PREFETCH_WINDOW``, default half the
    memory available); closing the handle calls it off. ``drop_cache``: with ``prefetch``,
    release the page-cache pages of what was read once the reader is past them (default:
    ``WEIGHTLIFT_DROP_CACHE=1`` in the environment), for hosts with less memory than the
    model. ``memory_budget``, ``prefetch_window`` (bytes; default: from the memory available
    and the environment, see ``weightlift.memory_budget()``) and ``threads`` tune the
    prefetch.
    """

    def __init__(
        self,
        filename,
        framework,
        device="cpu",
        backend="auto",
        token=None,
        prefetch=False,
        drop_cache=None,
        memory_budget=None,
        prefetch_window=None,
        threads=None,
    ):
        self._framework = _args.framework(framework)
        self._layout = _args.layout(self._framework)
        self._device = _args.device(self._framework, device)
        self._handle = _handle.open_handle(
            filename,
            backend,
            token=token,
            memory_budget=memory_budget,
            prefetch_window=prefetch_window,
        )
        self._bases = _arrays.TorchBases()
        # Started with the first slice asked for or read, not here: a caller that only lists
        # keys or reads metadata, or reads in other ways (a placement load of the whole
        # file), never pays for it.
        self._prefetch_pending = None
        if prefetch and self._device == "cpu":
            # Defaults (threads, drop_cache) from the environment: see weightlift's README.
            self._prefetch_pending = dict(threads=threads, drop_cache=drop_cache)
            # Callers that prefetch open every file of a model before reading any: the
            # window knows from the first read whether all of them fit in memory.
            self._handle.announce()
            with _PENDING_LOCK:
                _PENDING[:] = [r for r in _PENDING if r() is not None]
                _PENDING.append(weakref.ref(self))

    def _start_own_prefetch(self):
        args, self._prefetch_pending = self._prefetch_pending, None
        if args is not None and self._handle is not None:
            self._handle.prefetch(**args)

    def _start_prefetch(self):
        """Starts this handle's prefetch, then those of every handle opened to prefetch and
        not started or closed yet, in the order they were opened: the window registers the
        files the reader will read next, so its threads read them (one thread per file)
        while the reader is on this one. Started one file at a time, as each was first read,
        the window had only the reader's file to read, one read at a time, and the reader
        waited on it (hf-moe-large cold, unthrottled, median of 5: 2.70 s against 1.72 s;
        `cat` of the files 2.50 s)."""
        stop_early_reads()
        self._start_own_prefetch()
        with _PENDING_LOCK:
            pending = list(_PENDING)
            _PENDING.clear()
        for ref in pending:
            other = ref()
            if other is not None:
                other._start_own_prefetch()

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
        self._prefetch_pending = None
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
        if self._prefetch_pending is not None:
            self._start_prefetch()
        memory, entry = self._h().get(name, ranges, layout=self._layout)
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
        # Asking for slices says the caller will read (transformers asks for every tensor's
        # right after opening, before reading any): the prefetch starts here, so that the
        # files stream in while the caller prepares its reads.
        if self._prefetch_pending is not None:
            self._start_prefetch()
        return PySafeSlice(self, name)

    def get_tensors(self):
        """Every tensor, loaded in parallel, as a dict in file order."""
        return _handle.load_dict(self._h(), self._framework, self._device)


def _safe_open_handle(f, framework, device="cpu", *, backend="auto"):
    """``safe_open`` of an open file object (its ``name``), as safetensors' handle API."""
    if not hasattr(f, "fileno"):
        raise SafetensorError("expected an open file object with a file descriptor")
    return safe_open(f.name, framework, device, backend=backend)


def native(f):
    """The native checkpoint handle of an open ``safe_open`` (``SafetensorError`` once it is
    closed): what the package's other modules use of it."""
    return f._h()


def device(f):
    """The device a ``safe_open`` reads tensors to ("cpu", "cuda:0", ...)."""
    return f._device


def source(value):
    """(torch ``safe_open``, tensor name) behind a slice that one handed out (or a wrapper of
    one keeping it as ``_inner``, as transformers' loader does), else None."""
    inner = getattr(value, "_inner", value)
    if not isinstance(inner, PySafeSlice):
        return None
    owner = inner._owner
    return (owner, inner._name) if owner._framework == "pt" else None


def stop_prefetch(f):
    """Cancels a ``safe_open``'s prefetch, pending or started: for callers that read its
    tensors with planned loads of their own, which the prefetch would only compete with."""
    f._prefetch_pending = None
    native(f).close()
