"""Index expressions of ``PySafeSlice.__getitem__``, turned into what to read.

Same semantics as safetensors' slices: integers (negative ones count from the end) select
one position and drop the dimension; slices with a positive step (defaults: whole
dimension, step 1); one ``...``; trailing dimensions are taken whole. Out-of-range
positions are errors, not clamped. (Negative slice bounds also count from the end, which
safetensors rejects with an ``OverflowError``.)
"""

import operator

from ._native import SafetensorError


def _fail(index, shape, why):
    return SafetensorError(f"Error during slicing {index!r} with shape {list(shape)}: {why}")


def plan(index, shape, name):
    """Returns (ranges, steps, squeeze): one (start, stop) per dimension to read, the step to
    apply to each dimension of what was read, and the dimensions to drop."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise _fail(index, shape, "an index can only have a single ellipsis ('...')")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        rest = len(items) - 1
        fill = (slice(None),) * max(len(shape) - rest, 0)
        items = items[:at] + fill + items[at + 1 :]
    if len(items) > len(shape):
        raise _fail(index, shape, "more slicing indexes than dimensions in tensor")

    ranges, steps, squeeze = [], [], set()
    for dim, (item, size) in enumerate(zip(items, shape)):
        if isinstance(item, slice):
            step = 1 if item.step is None else operator.index(item.step)
            if step <= 0:
                raise _fail(index, shape, f"slice step must be positive, got {step}")
            start = 0 if item.start is None else operator.index(item.start)
            stop = size if item.stop is None else operator.index(item.stop)
            start = start + size if start < 0 else start
            stop = stop + size if stop < 0 else stop
            for bound in (start, stop):
                if bound < 0 or bound > size:
                    raise _fail(
                        index,
                        shape,
                        f"index {bound} out of bounds for tensor dimension #{dim} of size {size}",
                    )
            ranges.append((start, max(start, stop)))
            steps.append(step)
        else:
            try:
                i = operator.index(item)
            except TypeError:
                raise _fail(
                    index, shape, f"unsupported index {item!r} (use integers, slices or ...)"
                ) from None
            j = i + size if i < 0 else i
            if not 0 <= j < size:
                raise _fail(
                    index, shape, f"index {i} out of bounds for tensor dimension #{dim} of size {size}"
                )
            ranges.append((j, j + 1))
            steps.append(1)
            squeeze.add(dim)
    steps.extend([1] * (len(shape) - len(items)))
    return ranges, steps, squeeze
