"""``weightlift.patch()``: safetensors' loading entry points load through weightlift.

From ``patch()`` on, ``safetensors.safe_open``, ``safetensors.torch.load_file``/``load`` and
``safetensors.numpy.load_file``/``load`` are weightlift's, and so is every name other
modules already imported from them (``transformers.modeling_utils.safe_open``, accelerate's
and diffusers' imports, anyone's ``from safetensors.torch import load_file``): every module in
``sys.modules`` is searched for attributes that *are* the originals. Modules imported later
get weightlift's from safetensors itself. ``unpatch()`` puts every original back.

The patched ``safe_open`` prefetches (``prefetch=True``) from its first read on: the bytes are
in memory by the time the caller reads them, rather than faulted in 4 KiB at a time.

transformers: its conversion step, ``convert_and_load_state_dict_in_model``, is weightlift's
too from the first patched ``safe_open`` on (or from ``patch()``, when transformers is
imported already): each parameter is allocated once in its final dtype and filled straight
from the files (see ``weightlift._transformers``). That is so wherever transformers has the
internals the adapter relies on (``weightlift._transformers.surface()``, checked once); where
one is missing or changed, or with ``patch(conversion=False)``, the conversion step stays
transformers' own (one INFO line on the ``weightlift.transformers`` logger says why).
"""

import functools
import logging
import sys
import threading

from . import _open
from . import numpy as _wl_numpy
from . import torch as _wl_torch
from ._native import SafetensorError

_lock = threading.RLock()
_log = logging.getLogger("weightlift.transformers")
# (module, attribute, original) of every name replaced, while patched.
_replaced = []
# Whether transformers' conversion step is weightlift's while patched (`patch(conversion=)`).
_conversion = True


def _their_errors(fn):
    """Raises weightlift's errors as safetensors' own ``SafetensorError`` (with weightlift's
    message), so that code written against safetensors catches them."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SafetensorError as e:
            import safetensors

            raise safetensors.SafetensorError(str(e)) from e

    return call


class _Slice:
    """A ``PySafeSlice`` whose errors are safetensors' own."""

    def __init__(self, inner):
        self._inner = inner

    get_shape = property(lambda self: self._inner.get_shape)
    get_dtype = property(lambda self: self._inner.get_dtype)

    def __len__(self):
        return len(self._inner)

    @_their_errors
    def __getitem__(self, index):
        return self._inner[index]


class _PrefetchingSafeOpen(_open.safe_open):
    """``safe_open`` as the patched libraries get it: it prefetches, takes safetensors'
    arguments (``backend`` is keyword-only there) and raises safetensors' errors."""

    @_their_errors
    def __init__(self, filename, framework, device="cpu", *, backend="mmap", **kwargs):
        kwargs.setdefault("prefetch", True)
        super().__init__(filename, framework, device, backend=backend, **kwargs)
        _hook_transformers()

    keys = _their_errors(_open.safe_open.keys)
    offset_keys = _their_errors(_open.safe_open.offset_keys)
    metadata = _their_errors(_open.safe_open.metadata)
    get_tensor = _their_errors(_open.safe_open.get_tensor)
    get_tensors = _their_errors(_open.safe_open.get_tensors)

    @_their_errors
    def get_slice(self, name):
        if _hooked():
            # transformers' conversion step is weightlift's: it plans its own reads of the
            # files (a prefetch now would only compete with them); where it leaves a load to
            # transformers, that code's first read starts the prefetch.
            return _Slice(_open.PySafeSlice(self, name))
        return _Slice(super().get_slice(name))


@_their_errors
def _torch_load_file(filename, device="cpu", *, backend="mmap"):
    return _wl_torch.load_file(filename, device=device, backend=backend)


_torch_load = _their_errors(_wl_torch.load)


@_their_errors
def _numpy_load_file(filename, *, backend="mmap"):
    return _wl_numpy.load_file(filename, backend=backend)


_numpy_load = _their_errors(_wl_numpy.load)


def _targets():
    """{id(original): (original, replacement)} for the safetensors modules importable here."""
    import safetensors

    pairs = [(safetensors.safe_open, _PrefetchingSafeOpen)]
    # safetensors.torch imports torch (~300 MB, seconds): only where torch is imported
    # already. Imported later, it binds the patched `safe_open` from `safetensors` itself.
    if "safetensors.torch" in sys.modules or "torch" in sys.modules:
        try:
            import safetensors.torch as st_torch

            pairs += [
                (st_torch.load_file, _torch_load_file),
                (st_torch.load, _torch_load),
                (st_torch.safe_open, _PrefetchingSafeOpen),
            ]
        except ImportError:  # no torch
            pass
    import safetensors.numpy as st_numpy

    pairs += [
        (st_numpy.load_file, _numpy_load_file),
        (st_numpy.load, _numpy_load),
        (st_numpy.safe_open, _PrefetchingSafeOpen),
    ]
    return {id(orig): (orig, new) for orig, new in pairs if orig is not new}


def _swap(found):
    """Replaces, in every loaded module, each attribute whose value `found` maps (by
    identity); returns (module, name, old value) for each replacement."""
    done = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or getattr(module, "__name__", "").startswith(
            "weightlift"
        ):
            continue
        for name, value in list(namespace.items()):
            hit = found.get(id(value))
            if hit is not None and hit[0] is value:
                namespace[name] = hit[1]
                done.append((module, name, value))
    return done


def _hooked():
    """Whether transformers' conversion step is weightlift's now."""
    cml = sys.modules.get("transformers.core_model_loading")
    current = getattr(cml, "convert_and_load_state_dict_in_model", None)
    return getattr(current, "_weightlift_original", None) is not None


def _hook_transformers():
    """Once transformers is imported and while patched: ``from_pretrained`` starts reading
    the checkpoint's files as soon as it is called (see ``weightlift._transformers.warming``),
    and transformers' conversion step is weightlift's where transformers has what the adapter
    relies on (see ``weightlift._transformers.surface()``)."""
    _hook_from_pretrained()
    cml = sys.modules.get("transformers.core_model_loading")
    if cml is None or not _conversion:
        return
    original = getattr(cml, "convert_and_load_state_dict_in_model", None)
    if original is None or getattr(original, "_weightlift_original", None) is not None:
        return
    from . import _transformers

    with _lock:
        if not _replaced or not _conversion or getattr(
            cml.convert_and_load_state_dict_in_model, "_weightlift_original", None
        ):
            return
        problem = _transformers.surface_problem(cml)
        if problem is not None:
            if id(cml) not in _told:
                _told.add(id(cml))
                import transformers

                _log.info(
                    "weightlift: transformers %s's conversion step stays its own "
                    "(weightlift reads the files): %s",
                    getattr(transformers, "__version__", "?"),
                    problem,
                )
            return
        wrapped = _transformers.wrap(original)
        _replaced.extend(_swap({id(original): (original, wrapped)}))


# The transformers modules whose missing internals were logged already (once each).
_told = set()
# (class, attribute, original descriptor) of the class attributes replaced, while patched.
_class_patches = []


def _hook_from_pretrained():
    """``PreTrainedModel.from_pretrained`` warms the page cache with the checkpoint's files
    while transformers builds the model (see ``weightlift._transformers.warming``)."""
    mu = sys.modules.get("transformers.modeling_utils")
    cls = getattr(mu, "PreTrainedModel", None)
    if cls is None:
        return
    from . import _transformers

    with _lock:
        if not _replaced or any(c is cls for c, _, _ in _class_patches):
            return
        original = cls.__dict__.get("from_pretrained")
        if not isinstance(original, classmethod):
            return
        setattr(cls, "from_pretrained", classmethod(_transformers.warming(original.__func__)))
        _class_patches.append((cls, "from_pretrained", original))


def _unhook_from_pretrained():
    for cls, name, original in _class_patches:
        setattr(cls, name, original)
    _class_patches.clear()


class _AfterImport:
    """A meta-path finder that hooks transformers once ``transformers.modeling_utils`` is
    imported (for ``patch()`` called before transformers is imported: the hooks must be in
    place before ``from_pretrained`` runs, not at its first ``safe_open``)."""

    TARGET = "transformers.modeling_utils"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_hook(module):
            exec_module(module)
            _hook_transformers()

        loader.exec_module = exec_then_hook
        return spec


_finder = _AfterImport()


def _watch_imports(on):
    if on and _finder not in sys.meta_path and "transformers.modeling_utils" not in sys.modules:
        sys.meta_path.insert(0, _finder)
    elif not on and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def _unhook_transformers():
    """Puts transformers' own conversion step back (the rest stays patched)."""
    keep = []
    for module, name, original in _replaced:
        current = module.__dict__.get(name)
        if getattr(current, "_weightlift_original", None) is original:
            module.__dict__[name] = original
        else:
            keep.append((module, name, original))
    _replaced[:] = keep


def patched():
    """Whether safetensors' entry points load through weightlift now."""
    with _lock:
        return bool(_replaced)


def unpatch():
    """Puts every original back (also in modules imported since ``patch()``). Idempotent."""
    with _lock:
        _watch_imports(False)
        _unhook_from_pretrained()
        if not _replaced:
            return
        originals = {id(new): (new, orig) for orig, new in _targets_from(_replaced)}
        _swap(originals)
        _replaced.clear()


def _targets_from(replaced):
    """(original, replacement) pairs of what was replaced."""
    pairs = {}
    for module, name, original in replaced:
        pairs[id(original)] = (original, module.__dict__.get(name))
    return [(orig, new) for orig, new in pairs.values() if new is not None]


class _Patch:
    """What ``patch()`` returns: usable as a context manager that restores the state it found."""

    def __init__(self, was_patched):
        self._was_patched = was_patched

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._was_patched:
            unpatch()
        return False


def patch(conversion=True):
    """Makes safetensors' loading entry points, and the names already imported from them,
    load through weightlift (see the module docs). Idempotent and thread-safe; undone by
    ``unpatch()``; as ``with weightlift.patch(): ...`` it is undone on leaving the block
    (unless it was patched before).

    ``conversion=False`` leaves transformers' conversion step its own (only safetensors'
    entry points are weightlift's): what happens anyway on a transformers that lacks an
    internal the adapter relies on. It applies from this call on, also to a patch in place."""
    global _conversion
    with _lock:
        _conversion = bool(conversion)
        was = bool(_replaced)
        if not was:
            _replaced.extend(_swap(_targets()))
            _watch_imports(True)
        _hook_from_pretrained()
        if _conversion:
            _hook_transformers()
        else:
            _unhook_transformers()
        return _Patch(was)
