"""vLLM's parameters filled straight from the files, where vLLM's own weight loaders say.

vLLM's ``model.load_weights`` hands every checkpoint tensor to its parameter's
``weight_loader``, which takes views of it and of the parameter (an expert's row of a fused
tensor, a shard of fused qkv or gate/up, a tensor-parallel slice) and copies one into the
other. Here the loaders are handed views of private mappings of the files that nothing reads
(no page is faulted in), and while they run ``Tensor.copy_`` (on the loading thread only) is
recorded instead of made where its source is such a view: the parameter's memory, offset and
strides, and the block of the checkpoint tensor the view covers (found from the pointer).
Once a file's tensors have all been handed over, one planned load of that file
(``load_into``: coalesced reads, in parallel, without the GIL) fills every destination
recorded for it, while vLLM goes on with the next file; the iterator's last step waits for
every file.

A copy that cannot be a placement (its source computed by the loader: arithmetic, a
conversion, a concatenation; a view that is not a block of the tensor; a destination written
across its rows) is made as vLLM makes it, reading through the mapping, after the placements
recorded so far are carried out (so that parameters see writes in the order the loaders made
them); one DEBUG line names the tensor vLLM was handed last. Whatever else a loader does with a
tensor reads it through the mapping: the default way. No weight-loader logic is written here:
whatever vLLM's loaders do is what gets recorded, so new model classes and vLLM releases need
nothing here.
"""

import bisect
import logging
import math
import mmap
import threading

import torch

from . import _arrays, _native, _place
from ._native import InvalidPlacement, SafetensorError

_LOG = logging.getLogger("weightlift.vllm")

_COPY = torch.Tensor.copy_
# The recording on each thread that loads (a thread's `Source`), and the patch's users.
_RECORDING = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0


def _copy_(self, src, non_blocking=False):
    source = getattr(_RECORDING, "source", None)
    if source is not None:
        if source.record(self, src):
            return self
        source.before_default_copy(self, src)
    return _COPY(self, src, non_blocking)


def _install():
    global _PATCH_USERS
    with _PATCH_LOCK:
        _PATCH_USERS += 1
        torch.Tensor.copy_ = _copy_


def _uninstall():
    global _PATCH_USERS
    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS == 0:
            torch.Tensor.copy_ = _COPY


def box(offset, shape, strides, base_shape):
    """Where a view of a contiguous tensor of `base_shape` lies in it, the view given by its
    element `offset`, `shape` and `strides`: the index (a slice or an integer per dimension of
    the tensor, as ``get_slice`` takes it) and, for each dimension the index keeps, which
    dimension of the view it is; None where the view is not a block of the tensor, possibly
    permuted (a stepped slice, an expanded dimension)."""
    base_strides = [1] * len(base_shape)
    for i in range(len(base_shape) - 2, -1, -1):
        base_strides[i] = base_strides[i + 1] * base_shape[i + 1]
    taken = {}
    for d, (size, stride) in enumerate(zip(shape, strides)):
        if size == 1:
            continue
        b = next(
            (b for b in range(len(base_shape))
             if b not in taken and base_strides[b] == stride and base_shape[b] >= size
             and base_shape[b] > 1),
            None,
        )
        if b is None:
            return None
        taken[b] = d
    index, order = [], []
    for b in range(len(base_shape)):
        start, offset = divmod(offset, base_strides[b])
        if b in taken:
            stop = start + shape[taken[b]]
            if stop > base_shape[b]:
                return None
            index.append(slice(start, stop))
            order.append(taken[b])
        else:
            if start >= max(base_shape[b], 1):
                return None
            index.append(start)
    if offset:
        return None
    return index, order


class _File:
    """One checkpoint file: a private mapping of it that nothing reads unless a loader looks at
    values, a view per tensor, the tensors' byte starts (to tell which tensor a pointer into
    the mapping is in), and the placements recorded into it so far."""

    def __init__(self, path, handle):
        self.path, self.handle = path, handle
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.base = torch.frombuffer(self.map, dtype=torch.uint8) if size else torch.empty(0)
        self.ptr = self.base.data_ptr()
        self.end = self.ptr + size
        self.typed = {}
        self.names, self.starts, self.meta = [], [], []
        for name, code, shape, _, start in handle.spans():
            dtype = _arrays.torch_dtype(code)
            nbytes = math.prod(shape) * dtype.itemsize
            if start + nbytes > size:
                raise SafetensorError(
                    f"{path}: tensor {name!r} ends at byte {start + nbytes} of a file of {size} "
                    "bytes: the file is truncated"
                )
            self.names.append(name)
            self.starts.append(start)
            self.meta.append((name, dtype, tuple(shape), start))
        self.fills, self.dests, self.dest_at, self.pairs = [], [], {}, []

    def view(self, i):
        """Tensor `i` (in file order) as a view of the mapping (a copy where it is not aligned
        to its element size in the file, which is never placed)."""
        _, dtype, shape, start = self.meta[i]
        size = dtype.itemsize
        if start % size:
            return _arrays.torch_unaligned(self.base, start, dtype, shape)
        typed = self.typed.get(dtype)
        if typed is None:
            n = self.base.numel()
            typed = self.typed[dtype] = self.base[: n - n % size].view(dtype)
        return typed.as_strided(shape, _arrays.contiguous_strides(shape), start // size)

    def find(self, byte):
        """The tensor (name, dtype, shape, start) whose data holds file offset `byte`."""
        i = bisect.bisect_right(self.starts, byte) - 1
        return self.meta[i] if i >= 0 else None

    def take(self):
        """The placements recorded so far, handed over (the file starts recording anew)."""
        out = (self.fills, self.dests, self.pairs)
        self.fills, self.dests, self.dest_at, self.pairs = [], [], {}, []
        return out


class Source:
    """The checkpoint files behind one vLLM load: views of them for vLLM's weight loaders, the
    placements recorded per file, the file loads that carry them out (in the background, a
    file as soon as vLLM has been handed all of its tensors), and the copies that go the
    default way. `open_handle(path)` opens a file's native checkpoint."""

    def __init__(self, open_handle, threads=None, pool=None, params=None, early=None):
        self._open_handle = open_handle
        # An early read of the files (``weightlift._early.EarlyRead``), started before vLLM
        # built the model: each file's load waits until it is through with that file.
        self._early = early
        self._threads = threads
        self._pool = pool
        # `params()`: the model's parameters, whose memory an assembled one replaces (None:
        # nothing is assembled). Per storage of a parameter being assembled: its `_Fused`.
        self._params = params
        self._fused = {}
        # Covered, not yet handed to an assembly (one call per file for all of them).
        self._ready = []
        # Memory written otherwise than by whole pieces: never assembled.
        self._written = set()
        self.assembled = 0
        self._files = {}
        # The mappings' address ranges, sorted: (start, end, file); the file found last.
        self._ranges = []
        self._last = None
        self._running = []
        self._current = None
        self.placed = 0
        self.defaults = {}

    def weights(self, files, skip=None):
        """(name, tensor) of every tensor of `files`, file by file in file order, `skip(name)`
        left out; the copies vLLM makes from them are recorded while it iterates, and carried
        out file by file; the last step waits for every file."""
        _install()
        _RECORDING.source = self
        done = False
        try:
            # An early read that runs while vLLM builds the model brings the files in ahead
            # of their loads, which wait for it (file by file) and then find them in the page
            # cache; without one, each file is read by its own load as vLLM's loop reaches it
            # (a read ahead started here, where vLLM's loop and the loads already share the
            # cores, copied every byte once more on the way: hf-moe cold on this 2-core VM,
            # 1.60 s with it, 1.30 s without).
            early = self._early is not None and self._early.active()
            if self._params is not None and not early and not all(_cached(p) for p in files):
                # Decided once per load. Cold, each file is read once, by the load of all its
                # placements; assembling would read the experts' ranges in a read of their own
                # beside it, after vLLM's loop (hf-moe cold: 1.3-1.9 s against 1.0 s).
                _LOG.debug(
                    "weightlift: the files are not in the page cache: parameters are filled "
                    "by the files' loads, not assembled from their pages"
                )
                self._params = None
            for path in files:
                f = self._file(path)
                for i, name in enumerate(f.names):
                    if skip is not None and skip(name):
                        continue
                    self._current = name
                    yield name, f.view(i)
                self.file_done(path)
            self.finish()
            done = True
        finally:
            _RECORDING.source = None
            _uninstall()
            if not done:
                self.abandon()

    def _file(self, path):
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = _File(path, self._open_handle(path))
            if f.end > f.ptr:
                bisect.insort(self._ranges, (f.ptr, f.end, id(f), f))
        return f

    def _mapped(self, ptr):
        """The file whose mapping holds address `ptr`, or None."""
        f = self._last
        if f is not None and f.ptr <= ptr < f.end:
            return f  # vLLM hands the tensors over file by file
        i = bisect.bisect_right(self._ranges, (ptr, float("inf"))) - 1
        if i >= 0:
            start, end, _, f = self._ranges[i]
            if start <= ptr < end:
                self._last = f
                return f
        return None

    # -- recording

    def record(self, dest, src):
        """Records ``dest.copy_(src)`` as a placement where `src` is a view of a mapped file;
        False where it cannot be one (the copy then goes the default way)."""
        # `is_cpu`, not `device.type`: this runs once per checkpoint tensor, inside vLLM's loop.
        if not isinstance(src, torch.Tensor) or not src.is_cpu:
            return False
        f = self._mapped(src.data_ptr())
        if f is None:
            return False
        if not dest.is_cpu or dest.shape != src.shape or dest.is_complex():
            return False
        if dest.numel() == 0:
            return True
        byte = src.data_ptr() - f.ptr
        found = f.find(byte)
        if found is None:
            return False
        name, dtype, shape, start = found
        if src.dtype != dtype:
            return False
        key = dest.untyped_storage().data_ptr()
        whole = byte == start and src.shape == shape and src.is_contiguous()
        if whole and dest.dtype == dtype and self._fuse(key, dest, src, f, name):
            return True
        self._written_otherwise(key)
        if whole:
            # The whole tensor (the common case: an expert, a norm, a q projection).
            if shape and shape[-1] > 1 and dest.stride(-1) != 1:
                return False
            ranges, block, strides = None, shape, list(dest.stride())
        else:
            where = self._block(byte - start, src, shape, dest)
            if where is None:
                return False
            ranges, block, strides = where
        # The fill is made here, not by `_place.fills` (which load_into's callers use): that
        # asks the header and parses an index per placement, which this already knows, at
        # one call per checkpoint tensor inside vLLM's loop.
        at = f.dest_at.get(key)
        if at is None:
            at = f.dest_at[key] = len(f.dests)
            f.dests.append(dest)
        f.fills.append(
            _native.Fill(
                name,
                at,
                dest.storage_offset() * dest.element_size(),
                block=ranges,
                shape=block,
                strides=strides,
                dtype=None if dest.dtype == dtype else _place.dtype_code(dest.dtype),
            )
        )
        f.pairs.append((dest, src))
        self.placed += 1
        return True

    @staticmethod
    def _block(byte, src, shape, dest):
        """The part of a tensor of `shape` that `src` (a view of it starting `byte` bytes into
        it) covers, as a fill takes it: ``(ranges, block, strides)``, the destination's
        strides in the tensor's dimension order (0 where the index is an integer); None where
        it is not a block, or the destination is written across its rows."""
        where = box(byte // src.element_size(), src.shape, src.stride(), shape)
        if where is None:
            return None
        index, order = where
        kept = [dest.shape[d] for d in order]
        kept_strides = [dest.stride(d) for d in order]
        if kept and kept[-1] > 1 and kept_strides[-1] != 1:
            return None  # rows written across (a transposed copy): not a file load's
        ranges, block, strides, it = [], [], [], iter(zip(kept, kept_strides))
        for i in index:
            if isinstance(i, slice):
                size, stride = next(it)
                ranges.append((i.start, i.stop))
                block.append(size)
                strides.append(stride)
            else:
                ranges.append((i, i + 1))
                block.append(1)
                strides.append(0)
        return ranges, block, strides

    # -- parameters made of the files' pages

    def _fuse(self, key, dest, src, f, name):
        """Takes a whole, unconverted tensor copied into a C-contiguous part of a parameter's
        memory as a piece of that memory assembled from the files' pages (see
        ``weightlift._native.assemble``), once pieces cover all of it; False where the copy is
        to be a fill (nothing is assembled here, the memory has been written otherwise, or
        the destination is not contiguous)."""
        if self._params is None or not dest.is_contiguous():
            return False
        fused = self._fused.get(key)
        if fused is None:
            if key in self._written:
                return False
            nbytes = dest.untyped_storage().nbytes()
            if nbytes < _MIN_ASSEMBLED:
                return False
            fused = self._fused[key] = _Fused(nbytes, dest.element_size())
        if fused.covered == fused.nbytes:
            return False  # covered already: a second write of the same bytes
        size = dest.element_size()
        fused.pieces.append((f.handle, name, dest.storage_offset() * size))
        fused.held.append((f, name, dest, src))
        fused.covered += dest.numel() * size
        self.placed += 1
        if fused.covered == fused.nbytes:
            self._ready.append(fused)
        return True

    def _assemble_ready(self):
        """Hands the memories covered so far to one assembly call (each call has a cost of
        its own: the process's mappings counted, a pool started)."""
        ready, self._ready = self._ready, []
        if ready:
            paths = {f.path for fused in ready for f, _, _, _ in fused.held}
            future = self._submit(self._after_early, paths, _assemble, ready)
            for i, fused in enumerate(ready):
                fused.future = _Part(future, i)

    def _written_otherwise(self, key):
        """The memory at `key` is written other than by whole pieces (a fill, a default
        copy): never assembled, and what was gathered for it so far is filled."""
        fused = self._fused.get(key)
        if fused is not None:
            self._unfuse(key, fused)
        self._written.add(key)

    def _unfuse(self, key, fused):
        """`key`'s memory is not assembled after all (it is written otherwise, or pieces do
        not cover it): its pieces are loaded as fills, into the memory vLLM made (or, where
        the assembly ran already, its bytes copied there)."""
        del self._fused[key]
        if fused in self._ready:
            self._ready.remove(fused)
        if fused.future is not None:
            memory = fused.future.result()
            if memory is not None:
                _COPY(_bytes_of(fused.held[0][2]), _arrays.torch_base(memory))
                return
        for job in _fills(fused.held):
            self._submit(_load, *job, self._threads).result()

    def _submit(self, fn, *args):
        """`fn(*args)` in the background pool (at once, where there is none): its future."""
        if self._pool is None:
            return _Done(fn(*args))
        future = self._pool.submit(fn, *args)
        self._running.append(future)
        return future

    def _swap(self):
        """Every parameter whose memory was assembled views the assembly instead (vLLM's
        memory for it, never written, is freed); memory that is not one parameter's whole
        gets the assembled bytes copied in."""
        fused = {k: v for k, v in self._fused.items() if v.future is not None}
        self._fused.clear()
        if not fused:
            return
        owners = {}
        for param in self._params():
            key = param.untyped_storage().data_ptr()
            if key in fused:
                owners.setdefault(key, []).append(param)
        for key, one in fused.items():
            memory = one.future.result()
            if memory is None:
                continue  # filled the ordinary way
            base = _arrays.torch_base(memory)
            params = owners.get(key, [])
            if params and all(
                p.storage_offset() == 0 and p.is_contiguous()
                and p.numel() * p.element_size() == one.nbytes
                for p in params
            ):
                for p in params:
                    p.data = base.view(p.dtype).view(p.shape)
                self.assembled += 1
            else:
                _COPY(_bytes_of(one.held[0][2]), base)

    def before_default_copy(self, dest, src):
        """A copy made the default way is about to run: what was recorded before it is
        carried out first."""
        self._written_otherwise(dest.untyped_storage().data_ptr())
        name = self._current
        if name is not None and name not in self.defaults:
            self.defaults[name] = True
            _LOG.debug("weightlift: %s goes vLLM's default way (a copy that is not a placement)", name)
        if any(f.fills for f in self._files.values()):
            for path in list(self._files):
                self.file_done(path)
        self.wait()

    def file_done(self, path):
        """Every tensor of `path` was handed over: its placements start loading, and the
        memories its pieces completed start being assembled."""
        self._assemble_ready()
        f = self._files.get(path)
        if f is None or not f.fills:
            return
        fills, dests, pairs = f.take()
        self._submit(self._after_early, (path,), _load, f.handle, fills, dests, pairs, self._threads)

    def _after_early(self, paths, fn, *args):
        """`fn(*args)`, once the early read is through with every file of `paths`."""
        if self._early is not None:
            for path in sorted(paths):
                self._early.wait(path)
        return fn(*args)

    def wait(self):
        running, self._running = self._running, []
        for r in running:
            r.result()

    def finish(self):
        """Carries out every placement recorded, and waits for them; parameters assembled
        take their new memory."""
        for key, fused in list(self._fused.items()):
            if fused.covered != fused.nbytes:
                self._unfuse(key, fused)
        for path in list(self._files):
            self.file_done(path)
        self._assemble_ready()
        self.wait()
        self._swap()

    def abandon(self):
        """Waits for the file loads running (they write into parameters), their errors
        dropped: for a load that stops early, whose own error is the one to report."""
        for f in self._files.values():
            f.take()
        self._fused.clear()
        self._ready.clear()
        running, self._running = self._running, []
        for r in running:
            try:
                r.result()
            except Exception:  # noqa: BLE001 (the caller's error is the one reported)
                pass


class _Fused:
    """A parameter's memory being assembled from whole checkpoint tensors: its size, the
    alignment its first byte needs, the pieces recorded so far (native checkpoint, tensor
    name, byte position), the views they were copied into (to fill them the ordinary way
    where it is not assembled after all), the bytes they cover, and the assembly once they
    cover it all."""

    def __init__(self, nbytes, align):
        self.nbytes, self.align = nbytes, align
        self.pieces, self.held, self.covered, self.future = [], [], 0, None


def _cached(path, probes=16):
    """Whether `path` looks to be in the page cache: a byte at each of `probes` places through
    it reads without waiting for storage (``RWF_NOWAIT``). No I/O either way."""
    import os

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(1)
        for i in range(probes):
            try:
                if os.preadv(fd, [buf], size * i // probes, os.RWF_NOWAIT) != 1:
                    return False
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
                return False
        return True
    finally:
        os.close(fd)


# Memory smaller than this is filled: assembling it would copy it all the same (the files'
# pages are mapped only where a run covers 16 of them), at a call's cost.
_MIN_ASSEMBLED = 64 << 10


def _assemble(ready):
    """Assembles each `_Fused` of `ready` from the files' pages (one ``_native.assemble``
    call); the memory of each, or None where it was filled the ordinary way instead (its
    files are read, not mapped; the process has no room for more mappings; its pieces
    overlap, a region written twice)."""
    try:
        memories, _, _ = _native.assemble([(f.nbytes, f.align, f.pieces) for f in ready])
    except ValueError:
        # Pieces of one that overlap: each assembled alone, to find which.
        if len(ready) > 1:
            return [_assemble([f])[0] for f in ready]
        memories = [None]
    for fused, memory in zip(ready, memories):
        if memory is None:
            for job in _fills(fused.held):
                _load(*job, None)
    return memories


class _Part:
    """Item `i` of a future's list, with a future's ``result``."""

    def __init__(self, future, i):
        self._future, self._i = future, i

    def result(self):
        return self._future.result()[self._i]


def _fills(held):
    """Whole pieces (file, tensor name, destination, source view) as one load per file:
    (native checkpoint, fills, destinations, (destination, source) pairs)."""
    by_file = {}
    for f, name, dest, src in held:
        by_file.setdefault(id(f), (f, []))[1].append((name, dest, src))
    for f, pieces in by_file.values():
        fills, dests, at = [], [], {}
        for name, dest, _ in pieces:
            # One destination per memory, as load_into takes them (offsets are the memory's).
            i = at.setdefault(dest.untyped_storage().data_ptr(), len(dests))
            if i == len(dests):
                dests.append(dest)
            fills.append(_native.Fill(name, i, dest.storage_offset() * dest.element_size(),
                                      shape=list(dest.shape), strides=list(dest.stride())))
        yield f.handle, fills, dests, [(d, s) for _, d, s in pieces]


def _bytes_of(tensor):
    """All of `tensor`'s memory, as bytes."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())


class _Done:
    """A result computed at once, with a future's ``result``."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _load(handle, fills, dests, pairs, threads):
    """One file's placements, in one planned load; where that load refuses them (two writing
    the same bytes, as a loader that writes a region twice would), made one by one in the
    loaders' order, reading through the mapping."""
    try:
        handle.load_into(fills, dests, threads=threads)
    except InvalidPlacement as e:
        _LOG.debug("weightlift: placements copied one by one: %s", e)
        for dest, src in pairs:
            _COPY(dest, src)
