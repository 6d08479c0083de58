"""``load_into``: blocks of tensors read straight into torch tensors the caller owns, in one
planned load (coalesced reads, run in parallel without the GIL, converted on the way where the
destination's dtype asks for it). Fused parameters are filled in place: each expert into its
row of a stacked tensor, gate and up halves side by side, q/k/v rows cut from one tensor.
Destinations on a CUDA device are filled through pinned staging buffers (one read lands in a
buffer, its blocks are copied to their places on the device while the next reads run)."""

from . import _args, _arrays, _handle, _native, _slicing
from ._native import InvalidPlacement, SafetensorError

_CODES = {name: code for code, name in _arrays.TORCH_DTYPES.items()}


def dtype_code(dtype):
    """The safetensors dtype code of a torch dtype."""
    found = _CODES.get(str(dtype).removeprefix("torch."))
    if found is None:
        raise SafetensorError(f"{dtype} has no safetensors dtype")
    return found


class Block:
    """A block of a tensor's memory, as a view would describe it, without making the view:
    ``base`` (a tensor), the element ``offset`` into it, ``shape`` and ``strides`` (elements).
    Thousands of them cost nothing, where as many torch views cost torch's dispatch each (tens
    of microseconds inside transformers' loading, which runs under a device mode)."""

    __slots__ = ("base", "offset", "shape", "strides", "regroups")

    def __init__(self, base, offset, shape, strides, regroups=False):
        self.base, self.offset, self.shape, self.strides = base, offset, shape, strides
        # Whether the source block's elements, in C order, are seen as this block's shape
        # (same count, another shape): see `interleaved`.
        self.regroups = regroups

    @staticmethod
    def of(tensor):
        return Block(tensor, tensor.storage_offset(), list(tensor.shape), list(tensor.stride()))

    def index(self, i):
        """The block at position `i` of the first dimension (``tensor[i]``)."""
        return Block(self.base, self.offset + i * self.strides[0], self.shape[1:], self.strides[1:])

    def interleaved(self, dim, inverse=False):
        """Where transformers' ``Interleave(dim)`` puts a source tensor's elements when its
        result is this block: the source's `dim` seen as ``[n / 2, 2]`` (``inverse``:
        ``[2, n / 2]``), the two parts sent to the two halves (alternate rows)."""
        n, step = self.shape[dim], self.strides[dim]
        parts = [2, n // 2] if inverse else [n // 2, 2]
        spread = [step, 2 * step] if inverse else [step, (n // 2) * step]
        return Block(
            self.base,
            self.offset,
            self.shape[:dim] + parts + self.shape[dim + 1 :],
            self.strides[:dim] + spread + self.strides[dim + 1 :],
            regroups=True,
        )

    def narrow(self, dim, start, length):
        """``tensor.narrow(dim, start, length)``."""
        shape = list(self.shape)
        shape[dim] = length
        return Block(self.base, self.offset + start * self.strides[dim], shape, self.strides)


class _Bases:
    """Per base tensor (by identity): its storage's address and length, element size, dtype
    code and device, asked of torch once."""

    def __init__(self):
        self._known = {}

    def get(self, base):
        found = self._known.get(id(base))
        if found is None:
            storage = base.untyped_storage()
            found = self._known[id(base)] = (
                base,
                storage.data_ptr(),
                storage.nbytes(),
                base.element_size(),
                dtype_code(base.dtype),
                str(base.device),
            )
        return found[1:]


def fills(handle, placements):
    """The native fills and destinations for `placements`, per device: ``{device: (fills,
    dests)}``. A placement is ``(name, index, dest)`` with ``index`` a ``get_slice``-style
    index (slices and integers, step 1) or None for the whole tensor, ``dest`` a torch tensor
    on the CPU or a CUDA device (a view of a larger one is fine: its offset and strides say
    where the block goes) or a :class:`Block`. Checked here against the headers: the block's
    shape must be the destination's."""
    per_device, where = {}, {}
    bases = _Bases()
    for name, index, dest in placements:
        code, shape = handle.info(name)
        if not isinstance(dest, Block):
            dest = Block.of(dest)
        key, _, itemsize, want, device = bases.get(dest.base)
        if device != "cpu" and not device.startswith("cuda:"):
            raise InvalidPlacement(
                f"tensor {name!r}: load_into fills CPU and CUDA tensors (the destination is "
                f"on {device})"
            )
        out, dests = per_device.setdefault(device, ([], []))
        if index is None:
            ranges, squeeze = None, set()
            block = list(shape)
        else:
            ranges, steps, squeeze = _slicing.plan(index, shape, name)
            if any(step != 1 for step in steps):
                raise InvalidPlacement(f"tensor {name!r}: load_into takes blocks without steps")
            block = [b - a for a, b in ranges] + list(shape[len(ranges):])
        kept = [d for i, d in enumerate(block) if i not in squeeze]
        view = None
        if dest.regroups and not squeeze:
            view, strides = list(dest.shape), list(dest.strides)
        elif list(dest.shape) != kept:
            raise InvalidPlacement(
                f"tensor {name!r}: the destination has shape {list(dest.shape)}, "
                f"the block {kept} (of a tensor of shape {list(shape)})"
            )
        else:
            strides, it = [], iter(dest.strides)
            for i in range(len(block)):
                strides.append(0 if i in squeeze else next(it))
        at = where.get((device, key))
        if at is None:
            at = where[(device, key)] = len(dests)
            dests.append(dest.base)
        out.append(
            _native.Fill(
                name,
                at,
                dest.offset * itemsize,
                block=ranges,
                shape=block,
                strides=strides,
                dtype=None if want == code else want,
                view=view,
            )
        )
    return per_device


def load_into(source, placements, threads=None, backend="auto", token=None, max_gap=None):
    """Fills torch tensors you own with blocks of a checkpoint's tensors, in one planned load.

    ``source``: a path (file, directory, index, URL, model id) or an open ``safe_open``.
    ``placements``: ``(name, index, dest)`` triples: ``index`` as ``get_slice`` takes it
    (``None``: the whole tensor), ``dest`` a tensor (or a view of one) whose shape is the
    block's, on the CPU or a CUDA device (filled through pinned staging buffers, one load per
    device). Converts between float16, bfloat16 and float32 where the destination's dtype
    differs. Checked before anything is read: a block of the wrong shape, one that falls
    outside its destination or overlaps another's bytes raises ``InvalidPlacement`` (a
    ``SafetensorError``).
    ``max_gap``: the most unselected bytes between two blocks read (and dropped) to keep one
    read: only bytes of the two blocks' tensors, never a tensor nobody asked for (default 1
    MiB, the rule of every load; 0 reads exactly the blocks). Returns ``(bytes read, reads made)``. The
    destinations must not be touched by other threads until it returns (the GIL is released
    while it reads).
    """
    from ._open import native, safe_open

    if isinstance(source, safe_open):
        handle = native(source)
    else:
        handle = _handle.open_handle(source, backend, True, token)
    placements = list(placements)
    per_device = fills(handle, placements)
    read = reads = 0
    for device, (blocks, dests) in per_device.items():
        if device != "cpu":
            import torch

            # Work torch queued on these tensors' memory (on its streams) finishes before
            # weightlift's copies (on streams of its own) write it.
            torch.cuda.synchronize(device)
        n, r = handle.load_into(
            blocks, dests, threads=threads, max_gap=max_gap, device=_args.native_device(device)
        )
        read, reads = read + n, reads + r
    return read, reads
