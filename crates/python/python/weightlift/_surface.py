"""Checks that another library's internals are what an adapter relies on: a table of
(name, kind, detail) entries, checked once, whatever the library's version number. The
integrations (transformers' conversion step, vLLM's loader) run where every entry holds and
step aside, naming the first that does not, where one does not.

Kinds:

- ``"call"``: a callable whose leading parameters are ``detail`` (names), in that order;
- ``"kwargs"``: a callable that takes each of ``detail`` by name;
- ``"fields"``: a dataclass with the fields ``detail``;
- ``"present"``: anything by that name;
- ``"same"``: a function giving what ``detail[0]`` (the adapter's copy) gives on each of the
  samples ``detail[1]`` (as a sort key);
- ``"attribute"``: an attribute, on the instance ``detail()`` builds, of the name after the
  last dot;
- ``"op"``: a class built with the keywords ``detail``, which it keeps as attributes.
"""

import dataclasses
import inspect


def problem(entries, resolve):
    """The first entry of `entries` that does not hold, as "name why", or None. `resolve`
    turns a name into the object (raising AttributeError or ImportError where there is
    none)."""
    for name, kind, detail in entries:
        why = check(resolve, name, kind, detail)
        if why is not None:
            return f"{name} {why}"
    return None


def check(resolve, name, kind, detail):
    """Why the entry does not hold, or None."""
    if kind == "attribute":
        try:
            sample = detail()
        except Exception as e:  # noqa: BLE001 (any failure means it is not as expected)
            return f"cannot be built as the adapter builds it ({type(e).__name__}: {e})"
        return None if hasattr(sample, name.rpartition(".")[2]) else "missing"
    try:
        obj = resolve(name)
    except (AttributeError, ImportError):
        return "missing"
    if kind in ("call", "kwargs"):
        return _signature(obj, kind, detail)
    if kind == "fields":
        if not dataclasses.is_dataclass(obj):
            return "is not a dataclass"
        have = {f.name for f in dataclasses.fields(obj)}
        lacking = [d for d in detail if d not in have]
        return f"has no field {', '.join(lacking)}" if lacking else None
    if kind == "present":
        return None
    if kind == "same":
        ours, samples = detail
        try:
            same = sorted(samples, key=obj) == sorted(samples, key=ours)
        except Exception as e:  # noqa: BLE001
            return f"fails on samples ({type(e).__name__}: {e})"
        return None if same else "gives other results than the adapter's copy of it"
    if kind == "op":
        return op_problem(obj, detail)
    raise ValueError(f"unknown kind {kind!r}")


def _signature(obj, kind, detail):
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return "has no signature"
    names = [p.name for p in params]
    if kind == "call":
        if names[: len(detail)] != list(detail):
            return f"takes {tuple(names)}, not {tuple(detail)} first"
        return None
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    lacking = [d for d in detail if d not in names and not takes_any]
    return f"takes no {', '.join(lacking)}" if lacking else None


def op_problem(cls, keywords):
    """Why `cls` is not built with `keywords` (and keeps them as attributes), or None."""
    values = {k: (True if k == "inverse" else 1) for k in keywords}
    try:
        op = cls(**values)
    except Exception as e:  # noqa: BLE001
        return f"cannot be built with {sorted(values)} ({type(e).__name__}: {e})"
    differ = [k for k, v in values.items() if getattr(op, k, None) != v]
    return f"does not keep {', '.join(differ)}" if differ else None


def importer(name):
    """A resolver for names written "package.module:Attribute.attribute"."""
    import importlib

    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj
