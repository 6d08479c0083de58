"""vLLM's parameters filled straight from the files, where vLLM's own weight loaders say.

vLLM's ``model.load_weights`` hands every checkpoint tensor to its parameter's
``weight_loader``, which takes views of it and of the parameter (an expert's row of a fused
tensor, a shard of fused qkv or gate/up, a tensor-parallel slice) and copies one into the
other. Here the loaders are given placeholders instead of tensors: each carries the checkpoint
tensor's name, dtype and shape, and the view taken of it, and no bytes. A view of a placeholder
is a placeholder; ``copy_`` of a placeholder into a view of a parameter is recorded as a
placement (the parameter's memory, offset and strides; the block of the tensor) instead of
copied. Once a file's tensors have all been handed over, one planned load of that file
(``load_into``: coalesced reads, in parallel, converting dtypes on the way) fills every recorded
destination, while vLLM goes on with the next file's placeholders; the iterator's last step
waits for every file.

Anything a weight loader does with a placeholder that is not a view or a copy into a parameter
(arithmetic, concatenation, a transpose made contiguous, a look at the values) reads that
tensor from the file there and then and carries on with real tensors: that use goes the default
way (one DEBUG line names the tensor and the operation). Placements recorded so far are carried
out first, so that the parameters see their writes in the order the loaders made them. No
weight-loader logic is written here: whatever vLLM's loaders do is what gets recorded, so new
model classes and vLLM releases need nothing here.
"""

import logging
import threading

import torch
from torch.utils._pytree import tree_map

from . import _args, _arrays, _place

_LOG = logging.getLogger("weightlift.vllm")

aten = torch.ops.aten

# Operations that make a view of their first argument: on a placeholder, another placeholder
# (the view's offset, shape and strides computed on a meta tensor).
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.narrow.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.alias.default,
    aten.detach.default,
    aten.as_strided.default,
    aten.expand.default,
    aten.unflatten.int,
    aten.flatten.using_ints,
    # Several views at once.
    aten.unbind.int,
    aten.split.Tensor,
    aten.split_with_sizes.default,
}


class Placeholder(torch.Tensor):
    """A view of a checkpoint tensor not read yet: ``name`` in the file ``source``, of dtype
    ``base_dtype`` and shape ``base_shape``, seen as ``meta`` (a meta tensor with the view's
    offset, shape and strides over the tensor's contiguous elements) and as ``dtype`` (the
    checkpoint's, or another where a loader converted it: the file load converts once, to the
    parameter's dtype)."""

    @staticmethod
    def __new__(cls, source, name, meta, dtype):
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            meta.shape,
            strides=meta.stride(),
            storage_offset=meta.storage_offset(),
            dtype=dtype,
            device=torch.device("cpu"),
            requires_grad=False,
        )
        t.wl_source, t.wl_name, t.wl_meta = source, name, meta
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Placeholder({self.wl_name!r}, shape={list(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in _VIEWS and isinstance(first, Placeholder):
            meta = func(first.wl_meta, *args[1:], **kwargs)
            if isinstance(meta, (list, tuple)):
                return type(meta)(
                    Placeholder(first.wl_source, first.wl_name, m, first.dtype) for m in meta
                )
            return Placeholder(first.wl_source, first.wl_name, meta, first.dtype)
        if func is aten._to_copy.default and isinstance(first, Placeholder):
            # A conversion alone (`.to(dtype)`, same device and layout): the placement
            # converts instead.
            keys = set(kwargs) - {"dtype", "device", "layout", "non_blocking", "memory_format"}
            device = kwargs.get("device")
            if not keys and (device is None or torch.device(device).type == "cpu"):
                dtype = kwargs.get("dtype") or first.dtype
                if first.dtype == first.wl_source.dtype(first.wl_name):
                    return Placeholder(first.wl_source, first.wl_name, first.wl_meta, dtype)
        if func is aten.copy_.default and isinstance(args[1], Placeholder):
            dest, src = args[0], args[1]
            if not isinstance(dest, Placeholder) and src.wl_source.record(dest, src):
                return dest
        return first_real(func, args, kwargs)


def first_real(func, args, kwargs):
    """`func` run on real tensors: every placeholder among its arguments read from its file
    (its source's earlier placements carried out first)."""
    found = []

    def real(x):
        if isinstance(x, Placeholder):
            found.append(x)
            return x.wl_source.read(x)
        return x

    args, kwargs = tree_map(real, (args, kwargs))
    for p in found:
        p.wl_source.note_default(p.wl_name, func)
    return func(*args, **kwargs)


class _Box:
    """Where a placeholder's view lies in its tensor: the index (slices and integers, one per
    dimension of the tensor, as ``get_slice`` takes it) and, for each dimension of the view
    that the index keeps, which one of the view's dimensions it is; None where the view is not
    a box of the tensor, possibly permuted (a stepped slice, an expanded dimension)."""

    @staticmethod
    def of(meta, shape):
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        taken = {}
        for d, (size, stride) in enumerate(zip(meta.shape, meta.stride())):
            if size == 1:
                continue
            b = next(
                (b for b in range(len(shape))
                 if b not in taken and strides[b] == stride and shape[b] >= size and shape[b] > 1),
                None,
            )
            if b is None:
                return None
            taken[b] = d
        offset, index, order = meta.storage_offset(), [], []
        for b in range(len(shape)):
            start, offset = divmod(offset, strides[b]) if strides[b] else (0, offset)
            if b in taken:
                stop = start + meta.shape[taken[b]]
                if stop > shape[b]:
                    return None
                index.append(slice(start, stop))
                order.append(taken[b])
            else:
                if start >= max(shape[b], 1):
                    return None
                index.append(start)
        if offset:
            return None
        return tuple(index), order


class Source:
    """The checkpoint files behind one vLLM load: placeholders for their tensors, the
    placements recorded per file, the file loads that carry them out (in the background, a
    file as soon as vLLM has been handed all of its tensors), and the real reads of tensors
    that go the default way."""

    def __init__(self, files, open_handle, threads=None, pool=None):
        self._open_handle = open_handle
        self._handles = {}
        self._info = {}
        self._file_of = {}
        self._pending = {}
        self._running = []
        self._pool = pool
        self._threads = threads
        self._lock = threading.Lock()
        self.placed = 0
        self.defaults = {}
        self.files = list(files)

    # -- the tensors handed to vLLM

    def names(self, path):
        """The tensors of the file `path`, in file order."""
        return self._handle(path).offset_keys()

    def tensors(self, path, names):
        """(name, placeholder) for `names` of the file `path`, in file order."""
        handle = self._handle(path)
        for name in names:
            code, shape = handle.info(name)
            dtype = _arrays.torch_dtype(code)
            self._info[name] = (dtype, list(shape))
            self._file_of[name] = path
            meta = torch.empty(shape, dtype=dtype, device="meta")
            yield name, Placeholder(self, name, meta, dtype)

    def dtype(self, name):
        return self._info[name][0]

    def _handle(self, path):
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = self._open_handle(path)
        return h

    # -- recording

    def record(self, dest, src):
        """Records ``dest.copy_(src)`` as a placement of `src`'s block into `dest`; False
        where it cannot be one (the copy then goes the default way)."""
        if dest.shape != src.shape or dest.is_complex() or dest.device.type != "cpu":
            return False
        if src.dtype != self.dtype(src.wl_name) and src.dtype != dest.dtype:
            return False  # converted twice: leave it to torch
        if dest.numel() == 0:
            return True
        dtype, shape = self._info[src.wl_name]
        box = _Box.of(src.wl_meta, shape)
        if box is None:
            return False
        index, order = box
        if all(isinstance(i, slice) and i.start == 0 and i.stop == n for i, n in zip(index, shape)):
            index = None  # the whole tensor
        # The destination seen in the tensor's dimension order (the view's size-1 dimensions,
        # which address nothing, left out).
        shape = [dest.shape[d] for d in order]
        strides = [dest.stride(d) for d in order]
        if shape and shape[-1] > 1 and strides[-1] != 1:
            return False  # rows written across (a transposed copy): not a file load's
        block = _place.Block(dest, dest.storage_offset(), shape, strides)
        path = self._file_of[src.wl_name]
        self._pending.setdefault(path, []).append((src.wl_name, index, block))
        self.placed += 1
        return True

    def file_done(self, path):
        """Every tensor of `path` was handed over: its placements start loading."""
        placements = self._pending.pop(path, None)
        if placements:
            self._start(path, placements)

    def _start(self, path, placements):
        handle = self._handle(path)
        if self._pool is None:
            self._load(handle, placements)
        else:
            self._running.append(self._pool.submit(self._load, handle, placements))

    def _load(self, handle, placements):
        try:
            _place.fill(handle, placements, threads=self._threads)
        except _place.InvalidPlacement as e:
            # Placements one planned load refuses (two writing the same bytes, as a loader
            # that writes a region twice would): made one by one, in the loaders' order.
            _LOG.debug("weightlift: placements copied one by one: %s", e)
            for name, index, block in placements:
                memory, entry = handle.get(name, None, layout=_args.layout("pt"))
                whole = _arrays.torch_groups([(memory, [entry])], {})[name]
                src = whole if index is None else whole[index]
                dest = block.base.as_strided(block.shape, block.strides, block.offset)
                dest.copy_(src)

    def finish(self):
        """Carries out every placement recorded, and waits for them."""
        for path in list(self._pending):
            self.file_done(path)
        running, self._running = self._running, []
        for f in running:
            f.result()

    def abandon(self):
        """Waits for the file loads running (they write into parameters), their errors
        dropped: for a load that stops early, whose own error is the one to report."""
        running, self._running, self._pending = self._running, [], {}
        for f in running:
            try:
                f.result()
            except Exception:  # noqa: BLE001 (the caller's error is the one reported)
                pass

    # -- the default way

    def read(self, p):
        """The real tensor behind placeholder `p` (its view, in its dtype), read now, after
        every placement recorded so far is carried out."""
        self.finish()
        handle = self._handle(self._file_of[p.wl_name])
        memory, entry = handle.get(p.wl_name, None, layout=_args.layout("pt"))
        whole = _arrays.torch_groups([(memory, [entry])], {})[p.wl_name].contiguous()
        out = whole.as_strided(
            p.wl_meta.shape, p.wl_meta.stride(), whole.storage_offset() + p.wl_meta.storage_offset()
        )
        return out.to(p.dtype) if p.dtype != whole.dtype else out

    def note_default(self, name, func):
        if name not in self.defaults:
            self.defaults[name] = str(func)
            _LOG.debug("weightlift: %s goes vLLM's default way (%s on it)", name, func)
