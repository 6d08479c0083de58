"""Index expressions (``PySafeSlice.__getitem__``, ``slices=`` of ``load_checkpoint``), turned
into what to read, and what to do to the block once read.

The semantics and messages are safetensors' own: integers (negative ones count from the
end) select one position and drop the dimension; slices with a positive step (defaults:
whole dimension, step 1); one ``...``; ``()`` for everything; an empty list for an empty
selection of the first dimension; trailing dimensions are taken whole. Out-of-range
positions are errors, not clamped. (One deliberate difference: negative slice bounds count
from the end, as in numpy, where safetensors raises ``OverflowError``.)

The bounds are checked here, once, in safetensors' words; the native side reads exactly the
ranges it is given.
"""

import operator

from ._native import SafetensorError


def _show(start, stop, step):
    text = f"{'' if start is None else start}:{'' if stop is None else stop}"
    return text if step == 1 else f"{text}:{step}"


def plain_ranges(index, shape):
    """The ranges of the common tensor-parallel index (a slice or a tuple of slices, no step,
    bounds inside the shape and not negative) without ``plan``'s general parsing, or None
    for any other index (``plan`` then parses it, and reports errors)."""
    items = index if type(index) is tuple else (index,)
    if len(items) > len(shape):
        return None
    ranges = []
    for item, size in zip(items, shape):
        if type(item) is not slice or (item.step is not None and item.step != 1):
            return None
        start = 0 if item.start is None else item.start
        stop = size if item.stop is None else item.stop
        if type(start) is not int or type(stop) is not int:
            return None
        if not (0 <= start < size and 0 <= stop <= size):
            return None
        ranges.append((start, max(start, stop)))
    return ranges


def plan(index, shape, name):
    """Returns (ranges, steps, squeeze): one (start, stop) per dimension to read, the step to
    apply to each dimension of what was read, and the dimensions to drop (see ``finish``)."""
    if isinstance(index, list):
        if index:
            raise SafetensorError("Non empty lists are not implemented")
        items = (slice(0, 0),)
    else:
        items = index if isinstance(index, tuple) else (index,)
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise SafetensorError("Only one ellipsis (...) is allowed in slice index")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = (slice(None),) * max(len(shape) - (len(items) - 1), 0)
        items = items[:at] + fill + items[at + 1 :]

    # Each item as (start, stop, step, select); checked against the shape below.
    parsed = []
    for dim, item in enumerate(items):
        size = shape[dim] if dim < len(shape) else 0
        if isinstance(item, slice):
            step = 1 if item.step is None else operator.index(item.step)
            if step <= 0:
                raise SafetensorError(f"Slice step must be a positive integer, got {step}")
            start = None if item.start is None else operator.index(item.start)
            stop = None if item.stop is None else operator.index(item.stop)
            start = start + size if start is not None and start < 0 else start
            stop = stop + size if stop is not None and stop < 0 else stop
            parsed.append((start, stop, step, False))
        else:
            try:
                i = operator.index(item)
            except TypeError:
                raise SafetensorError(
                    f"Unsupported slice index at position {dim}: expected slice, int, or ellipsis"
                ) from None
            if i < 0:
                if i + size < 0:
                    raise SafetensorError(f"Invalid index {i} for dimension {dim} of size {size}")
                i += size
            parsed.append((i, i + 1, 1, True))

    def fail(why):
        # Shown as asked (negative positions already counted from the end).
        shown = ", ".join(str(p[0]) if p[3] else _show(*p[:3]) for p in parsed)
        return SafetensorError(
            f"Error during slicing [{shown}] with shape {list(shape)}: {why}"
        )

    if len(parsed) > len(shape):
        raise fail("more slicing indexes than dimensions in tensor")
    # Checked from the last dimension to the first, as safetensors does.
    for dim in reversed(range(len(parsed))):
        start, stop, _, _ = parsed[dim]
        size = shape[dim]
        start = 0 if start is None else start
        stop = size if stop is None else stop
        if start >= size or stop > size:
            asked = start if start >= size else stop - 1
            raise fail(
                f"index {asked} out of bounds for tensor dimension #{dim} of size {size}"
            )

    ranges, steps, squeeze = [], [], set()
    for dim, (start, stop, step, select) in enumerate(parsed):
        start = 0 if start is None else start
        stop = shape[dim] if stop is None else stop
        ranges.append((start, max(start, stop)))
        steps.append(step)
        if select:
            squeeze.add(dim)
    steps.extend([1] * (len(shape) - len(parsed)))
    return ranges, steps, squeeze


def finish(block, steps, squeeze):
    """The read block with the index's steps applied and its selected dimensions dropped."""
    if any(step != 1 for step in steps):
        block = block[tuple(slice(None, None, step) for step in steps)]
    if squeeze:
        block = block.reshape([d for i, d in enumerate(block.shape) if i not in squeeze])
    return block


def plans(handle, slices):
    """{name: ranges} for the native load and {name: (steps, squeeze)} for ``finish_all``,
    from ``slices(name, shape)`` (an index as ``get_slice`` takes, or None) over every
    tensor of `handle`."""
    import gc

    ranges, after = {}, {}
    # Tens of thousands of small tuples: the collector would otherwise walk every live object
    # (a model already loaded, say) several times over while they are made.
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name, shape in handle.shapes():
            index = slices(name, list(shape))
            if index is None:
                continue
            r = plain_ranges(index, shape)
            if r is not None:
                ranges[name] = r
                continue
            try:
                r, steps, squeeze = plan(index, shape, name)
            except SafetensorError as e:
                raise SafetensorError(f"slices for tensor {name!r}: {e}") from None
            ranges[name] = r
            if squeeze or any(step != 1 for step in steps):
                after[name] = (steps, squeeze)
    finally:
        if enabled:
            gc.enable()
    return ranges, after


def finish_all(out, after):
    """``finish`` for every tensor of `out` that ``plans`` said needs it."""
    for name, (steps, squeeze) in after.items():
        out[name] = finish(out[name], steps, squeeze)
