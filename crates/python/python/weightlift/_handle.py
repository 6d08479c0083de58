"""The native handle: opening a checkpoint, and one load through it made into a dict of
arrays. The native side decides everything about the files (URL or path or model id,
mapped or read); this module passes the user's arguments down."""

import os

from . import _args, _arrays, _slicing
from ._native import Checkpoint as _Checkpoint


class StateDict(dict):
    """A ``dict`` of name to tensor, with ``report``: one dict per file with ``file``,
    ``placement`` ("mapped", "owned", "device"), ``reason`` and ``bytes_read``."""

    report = ()


def open_handle(path, backend="auto", copy=False, token=None, memory_budget=None, prefetch_window=None):
    """The native checkpoint for `path` (a file, a directory, an index file, a URL or a
    model id). A path that does not exist raises ``FileNotFoundError``. `memory_budget` and
    `prefetch_window` (bytes, or sizes such as "8GiB") are the budget every use of it runs
    under (default: detected once, here; see ``weightlift.memory_budget()``)."""
    return _Checkpoint(
        os.fspath(path),
        backend=str(backend),
        copy=copy,
        token=token,
        memory_budget=_args.size(memory_budget),
        prefetch_window=_args.size(prefetch_window),
    )


def arrays(groups, framework, out):
    """Adds the tensors of native `groups` to `out` as numpy arrays or torch tensors."""
    if framework == "np":
        return _arrays.numpy_groups(groups, out)
    return _arrays.torch_groups(groups, out)


def load_dict(handle, framework, device, threads=None, prefix=None, drop_cache=False, slices=None):
    """Every tensor of `handle` (or those `prefix` and `slices` select) as a ``StateDict``
    on `device` (checked by the caller)."""
    # Tensors go to a GPU directly when torch will hold them there.
    native_device = device if device.startswith("cuda") else "cpu"
    ranges, after = _slicing.plans(handle, slices) if slices is not None else (None, {})
    groups, report = handle.load(
        device=_args.native_device(native_device),
        threads=threads,
        prefix=prefix,
        drop_cache=drop_cache,
        layout=_args.layout(framework),
        slices=ranges,
    )
    out = StateDict()
    out.report = report
    arrays(groups, framework, out)
    _slicing.finish_all(out, after)
    if native_device != device:
        for name, t in out.items():
            out[name] = t.to(device)
    return out
