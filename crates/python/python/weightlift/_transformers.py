"""``from_pretrained`` under ``weightlift.patch()``: transformers' conversion step
(``transformers.core_model_loading.convert_and_load_state_dict_in_model``) done by weightlift,
so that each parameter is allocated once, in its final dtype, and filled straight from the
files by one planned load per file, where transformers stacks experts with ``torch.stack``,
joins gate and up with ``torch.cat`` and deep-copies a converter per checkpoint key.

Same inputs, same outputs: keys are renamed by transformers' own ``rename_source_key``,
dtypes chosen by its rule, parameters set by its ``set_param_for_module`` (which records
missing, unexpected and mismatched keys as it does). What is handled here, per parameter:

- renamings (a checkpoint tensor is a parameter): on the CPU a view of the file's mapping
  where the dtype is the checkpoint's (as the plain patch gives), else filled converted;
- ``MergeModulelist(dim=0)``, alone or followed by ``Concatenate`` (fused experts,
  ``gate_up_proj``); ``Concatenate`` alone; ``Chunk`` and ``Split`` (fused qkv cut into q, k
  and v); ``Interleave`` (gate and up rows alternating in the file): each block read into
  its place in the parameter.

Parameters go where the device map puts them when it puts all of them on the CPU or on one
GPU (``device_map="cuda:0"``, ``{"": 0}``, "auto" on one GPU): on a GPU each parameter is
allocated there once and filled through pinned staging buffers, with no copy of the model in
host memory.

Anything else goes to transformers' own code, per parameter where it can (other conversion
ops, quantization ops, tensors of unlike shapes or dtypes) and per load otherwise (quantizers,
device maps that spread parameters over several devices or onto "meta", disk offload, tensor-parallel DTensors, pipeline stages,
tensors not opened by weightlift), with a debug line on the ``weightlift.transformers`` logger
saying what and why; and the whole conversion step where transformers lacks (or changed) an
internal the adapter relies on (``surface()``, checked once, whatever the version number), with
one INFO line saying which.
"""

import copy
import functools
import gc
import logging
import re
import time

from . import _args, _open

log = logging.getLogger("weightlift.transformers")


# What the adapter relies on in transformers, checked once when the hook is installed (see
# `surface_problem` and `weightlift._surface` for the kinds): the functions it calls (with the
# parameters it passes, by position or by name), the classes it builds or reads (with the
# attributes it reads), the conversion operations it implements, and the load-config fields it
# reads. Where everything is there, the adapter runs, whatever transformers' version number;
# where anything is missing or different, the conversion step stays transformers' own. Names
# are in `transformers.core_model_loading` unless they start with "transformers.".
def surface():
    """The table (a function: it names helpers defined below)."""
    return (
        ("convert_and_load_state_dict_in_model", "call",
         ("model", "state_dict", "load_config", "disk_offload_index")),
        ("rename_source_key", "call",
         ("source_key", "weight_renamings", "weight_converters", "base_model_prefix",
          "meta_state_dict")),
        ("set_param_for_module", "call",
         ("model", "target_name", "param_value", "loading_info", "hf_quantizer")),
        ("_add_unmatched_checkpoint_key", "call", ("key", "model", "loading_info")),
        ("spawn_materialize", "call", ("thread_pool", "tensor", "device", "dtype")),
        ("spawn_materialize", "kwargs", ("tensor_idx",)),
        ("build_glob_alternation", "call", ("globs",)),
        ("is_dtensor", "present", None),
        ("dot_natural_key", "same", (_natural_key, _SAMPLE_KEYS)),
        ("LoadStateDictInfo", "fields",
         ("missing_keys", "unexpected_keys", "mismatched_keys", "conversion_errors",
          "error_msgs", "skipped_pp_keys")),
        ("SkipParameters", "present", None),
        ("WeightRenaming", "call", ("source_patterns", "target_patterns")),
        ("WeightConverter", "call", ("source_patterns", "target_patterns", "operations")),
        ("WeightConverter.convert", "kwargs", ("model", "config", "hf_quantizer", "loading_info")),
        ("WeightConverter.add_tensor", "call",
         ("self", "target_key", "source_key", "source_pattern")),
        ("WeightConverter.was_used", "call", ("self",)),
        ("WeightConverter.source_patterns", "attribute", _sample_converter),
        ("WeightConverter.target_patterns", "attribute", _sample_converter),
        ("WeightConverter.operations", "attribute", _sample_converter),
        ("WeightConverter.quantization_operation", "attribute", _sample_converter),
        ("MergeModulelist", "op", ("dim",)),
        ("Concatenate", "op", ("dim",)),
        ("Chunk", "op", ("dim",)),
        ("Chunk.get_target_patterns", "call", ("self", "target_patterns")),
        ("transformers.modeling_utils.LoadStateDictConfig", "fields",
         ("device_map", "dtype", "dtype_plan", "hf_quantizer", "weight_mapping")),
    )


# Operations the adapter implements where transformers has them; where one is missing (or
# different), parameters converted by it go to transformers' own code, one by one.
OPTIONAL_OPS = (
    ("Split", ("dim",)),
    ("Interleave", ("dim", "inverse")),
)
# Keys `dot_natural_key` and the adapter's copy of it must order alike.
_SAMPLE_KEYS = (
    "model.layers.10.mlp.experts.2.w1.weight",
    "model.layers.2.mlp.experts.11.w3.weight",
    "lm_head.weight",
    "model.layers.2.shard_11.x",
    "model.layers.2.shard_2.x",
    "a.0",
)


def _sample_converter():
    from transformers import core_model_loading as cml

    return cml.WeightConverter("a.*.b", "a.b", operations=[cml.MergeModulelist(dim=0)])


def _resolver(cml):
    def resolve(name):
        if name.startswith("transformers."):
            import importlib

            module, _, attr = name.rpartition(".")
            return getattr(importlib.import_module(module), attr)
        obj = cml
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    return resolve


_checked = {}


def surface_problem(cml):
    """Why the adapter cannot run on the transformers whose ``core_model_loading`` is `cml`
    (its first missing or changed internal), or None. Checked once per module."""
    if cml not in _checked:
        from . import _surface

        _checked[cml] = _surface.problem(surface(), _resolver(cml))
    return _checked[cml]


def optional_ops(cml):
    """The optional conversion operations (see ``OPTIONAL_OPS``) this transformers has as the
    adapter expects them: {name: class}."""
    from ._surface import op_problem

    out = {}
    for name, keywords in OPTIONAL_OPS:
        cls = getattr(cml, name, None)
        if cls is not None and op_problem(cls, keywords) is None:
            out[name] = cls
    return out


def warming(from_pretrained):
    """``PreTrainedModel.from_pretrained`` (its function) that starts reading the checkpoint's
    files into the page cache as soon as it is called, where they are local safetensors
    files that fit the prefetch window and are not cached already: transformers resolves the
    files, reads the configuration and builds the whole model (hundreds of milliseconds for
    a large MoE) before it opens a file, and the read overlaps that work. Called off when
    ``from_pretrained`` returns, or earlier when a reader starts: weightlift's conversion
    step's planned loads, or transformers' first read through the patched ``safe_open`` (see
    ``weightlift._open.stop_early_reads``).

    While it runs, the objects that were there before are kept out of the garbage
    collector's walks (``weightlift._gc.frozen``): building a model and loading tens of
    thousands of tensors allocate enough to trigger full collections, each of which walks
    every object of the process (hf-moe-large, 18,867 tensors: stock ``from_pretrained``
    took 4.0-4.1 s here, 3.2-3.3 s with that alone)."""
    from . import _gc

    @functools.wraps(from_pretrained)
    def from_pretrained_warming(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        warm = _early_read(pretrained_model_name_or_path, kwargs)
        if warm is not None:
            _open.add_early_read(warm)
        try:
            with _gc.frozen():
                return from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)
        finally:
            if warm is not None:
                _open.remove_early_read(warm)
                warm.close()

    from_pretrained_warming._weightlift_original = from_pretrained
    return from_pretrained_warming


def _early_read(path, kwargs):
    """The early read of a ``from_pretrained`` call's checkpoint, or None where there is
    none to make (a GGUF file, a state dict, a variant, not safetensors, not a local
    directory)."""
    import os

    from . import _early

    if any(kwargs.get(k) for k in ("gguf_file", "state_dict", "variant")):
        return None
    if kwargs.get("use_safetensors") is False or not isinstance(path, (str, os.PathLike)):
        return None
    path = os.path.join(os.fspath(path), kwargs.get("subfolder") or "")
    if not os.path.isdir(path):
        return None
    return _early.EarlyRead(path, log)


def wrap(original):
    """transformers' ``convert_and_load_state_dict_in_model``, done by weightlift where it can."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def convert_and_load_state_dict_in_model(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        extra = set(values) - {"model", "state_dict", "load_config", "disk_offload_index"}
        if any(values[k] is not signature.parameters[k].default for k in extra):
            log.debug("weightlift: transformers' own conversion for this load: arguments %s", sorted(extra))
            return original(*args, **kwargs)
        model, state_dict, load_config = values["model"], values["state_dict"], values["load_config"]
        disk_offload_index = values.get("disk_offload_index")
        why = _unsupported(model, state_dict, load_config)
        if why is not None:
            log.debug("weightlift: transformers' own conversion for this load: %s", why)
            return original(*args, **kwargs)
        # The planned loads read the files from here on (hf-dense cold, median of 4-5: 0.67-0.81
        # s with the early read called off here, 1.21-1.25 s without; under 300 requests/s,
        # hf-moe reached the disk in 500-620 requests, 590-1,430 without).
        _open.stop_early_reads()
        # Tens of thousands of small objects (plans, blocks): the collector would otherwise
        # walk every live object (torch, transformers, the model) several times over.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return _load(model, state_dict, load_config, disk_offload_index)
        finally:
            if enabled:
                gc.enable()

    convert_and_load_state_dict_in_model._weightlift_original = original
    return convert_and_load_state_dict_in_model


def _unsupported(model, state_dict, load_config):
    """Why this load goes to transformers' own code, or None."""
    import torch
    from transformers.core_model_loading import is_dtensor

    if load_config.hf_quantizer is not None:
        return "a quantizer"
    if _one_device(load_config, torch) is None:
        where = sorted({str(w) for w in (load_config.device_map or {}).values()})
        return f"the device map places parameters on {where} (not all on the CPU or one GPU)"
    if getattr(model, "_pp_stage", None) is not None:
        return "a pipeline-parallel stage"
    if any(is_dtensor(p) for p in model.state_dict().values()):
        return "tensor-parallel parameters (DTensors)"
    for key, value in state_dict.items():
        src = _open.source(value)
        if src is None:
            return f"{key!r} was not opened through weightlift"
        if _open.device(src[0]) != "cpu":
            return f"{key!r} is read to {_open.device(src[0])}"
    return None


def _one_device(load_config, torch):
    """The device the device map puts every parameter on, "cpu" or "cuda:N"; None where it
    names several, or others ("disk", "meta", ...)."""
    found = set()
    for where in (load_config.device_map or {"": "cpu"}).values():
        if isinstance(where, int) and not isinstance(where, bool):
            where = torch.device("cuda", where)
        try:
            where = torch.device(where)
        except (RuntimeError, TypeError, ValueError):
            return None
        if where.type == "cuda":
            index = where.index if where.index is not None else torch.cuda.current_device()
            found.add(f"cuda:{index}")
        elif where.type == "cpu":
            found.add("cpu")
        else:
            return None
    return found.pop() if len(found) == 1 else None


class _Group:
    """The checkpoint tensors of one parameter (or one converter's targets)."""

    __slots__ = ("key", "converter", "original", "entries", "dtype", "device")

    def __init__(self, key, converter, original):
        self.key = key
        self.converter = converter
        # A renaming's checkpoint key.
        self.original = original
        # (source pattern, checkpoint key, value, tensor index) in the order collected.
        self.entries = []
        self.dtype = None
        self.device = None


def _load(model, state_dict, load_config, disk_offload_index):
    start = time.perf_counter()
    import torch
    from transformers import core_model_loading as cml

    base_model_prefix = model.base_model_prefix
    device = _one_device(load_config, torch)
    dtype = load_config.dtype
    dtype_plan = load_config.dtype_plan or {}
    weight_mapping = load_config.weight_mapping or []
    meta = model.state_dict()
    loading_info = cml.LoadStateDictInfo(
        missing_keys=set(meta.keys()),
        unexpected_keys=set(),
        mismatched_keys=set(),
        conversion_errors={},
        error_msgs=[],
        skipped_pp_keys=set(),
    )
    renamings = [e for e in weight_mapping if isinstance(e, cml.WeightRenaming)]
    converters = [e for e in weight_mapping if isinstance(e, cml.WeightConverter)]
    if dtype_plan:
        dtype_alt, dtype_by_group, _ = cml.build_glob_alternation(list(dtype_plan.keys()))
    pattern_to_converter = {k: c for c in converters for k in c.source_patterns}

    # The handles are read here by planned loads: their own prefetches would only compete.
    # (Asking the kernel to read the files ahead while the loads are planned gained nothing
    # on MoE checkpoints and cost dense ones: their touches after a cold load took 0.4-0.8 s
    # where they take 0.01 s without.)
    owners = {}
    for value in state_dict.values():
        owner, _ = _open.source(value)
        owners[id(owner)] = owner
    for owner in owners.values():
        _open.stop_prefetch(owner)

    # 1. Keys: renamed and grouped per parameter exactly as transformers does (its functions),
    #    without copying a converter per key.
    groups = {}
    rename = _Renamer(cml, renamings, converters, base_model_prefix, meta)
    for original_key, value in state_dict.items():
        shape_numbers = _Renamer.shape(original_key)
        renamed_key, source_pattern = rename(original_key, shape_numbers)
        if renamed_key in meta:
            empty_param = meta.get(renamed_key)
            group = groups.get(renamed_key)
            if group is None:
                converter = pattern_to_converter[source_pattern] if source_pattern is not None else None
                group = groups[renamed_key] = _Group(renamed_key, converter, original_key)
            pattern = source_pattern if source_pattern is not None else original_key
            _dtype = dtype
            if dtype_plan and dtype_alt.search(renamed_key):
                matched = dtype_alt.search(renamed_key)
                if matched is not None:
                    _dtype = dtype_plan[dtype_by_group[matched.lastgroup]]
            elif empty_param is not None and empty_param.dtype != _dtype:
                _dtype = empty_param.dtype
            group.entries.append((pattern, original_key, value, shape_numbers))
            group.dtype = _dtype
        elif source_pattern is not None:
            mapping = pattern_to_converter[source_pattern]
            for k in mapping.target_patterns:
                cml._add_unmatched_checkpoint_key(
                    renamed_key.replace(mapping.target_patterns[0], k), model, loading_info
                )
        else:
            cml._add_unmatched_checkpoint_key(renamed_key, model, loading_info)

    # The order transformers collects each parameter's tensors in: its keys' natural order
    # (it sorts every key; only the order within a parameter matters).
    for group in groups.values():
        if group.converter is not None and len(group.entries) > 1:
            # Keys of one shape (`experts.#.gate_proj`) are in natural order when their
            # numbers are; others are compared whole.
            shapes = {}
            for e in group.entries:
                shapes.setdefault(e[0], set()).add(e[3][0])
            if all(len(s) == 1 for s in shapes.values()):
                group.entries.sort(key=lambda e: (e[0], tuple(map(int, e[3][1]))))
            else:
                group.entries.sort(key=lambda e: _natural_key(e[1]))
        counts = {}
        for i, (pattern, original_key, value, _) in enumerate(group.entries):
            index = None
            if group.converter is not None:
                index = counts.get(pattern, 0)
                counts[pattern] = index + 1
            group.entries[i] = (pattern, original_key, value, index)
        group.device = device

    # 2. A plan per parameter: a view, placements into parameters allocated once, or
    #    transformers' own conversion.
    views = {}  # handle -> {checkpoint key: target}
    fills = {}  # handle -> [(name, index, dest view)]
    made = []  # (target name, tensor)
    placed = []  # (target name, tensor, blocks): to assemble or fill
    stock = []
    for key, group in groups.items():
        try:
            plan = _plan(group, model, torch, device)
        except _Unhandled as why:
            log.debug("weightlift: transformers' own conversion for %s: %s", key, why)
            stock.append(group)
            continue
        kind, payload = plan
        if kind == "view":
            owner, name = payload
            views.setdefault(id(_open.native(owner)), (owner, {}))[1][name] = key
        else:
            placed.extend(payload)

    # Parameters made of whole checkpoint tensors side by side (a layer's experts stacked,
    # gate and up): assembled in place from the files' pages where the files map, the rest
    # filled.
    assembled = _assemble(placed, torch) if device == "cpu" else {}
    for i, (target, tensor, blocks) in enumerate(placed):
        if i in assembled:
            made.append((target, assembled[i]))
            continue
        made.append((target, tensor))
        for owner, name, index, dest in blocks:
            fills.setdefault(id(_open.native(owner)), (owner, []))[1].append((name, index, dest))

    # 3. One load per file: views (mapped where the files map), then the placements.
    from . import _arrays
    from ._place import load_into

    # The placements first, each file's blocks in one planned load (coalesced reads of the
    # blocks only: the tensors between them are the views', populated in large reads of
    # their own by the mapped loads that follow).
    planned = time.perf_counter()
    # The files are loaded side by side (each load runs without the GIL): on a network
    # filesystem one file's reads alone do not keep the server busy.
    from concurrent.futures import ThreadPoolExecutor

    # On a GPU the files' loads share one pinned staging pool, held for the whole load.
    from . import _native

    staging = _native.Staging(device) if device != "cpu" and fills else None
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(fills)))) as pool:
        list(pool.map(lambda job: load_into(job[0], job[1]), fills.values()))
    del staging
    for target, tensor in made:
        cml.set_param_for_module(model, target, tensor, loading_info, None)
    filled = time.perf_counter()

    def view_load(job):
        owner, names = job
        groups_, _ = _open.native(owner).load(layout=_args.layout("pt"), names=set(names))
        return names, groups_

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(views)))) as pool:
        loaded = list(pool.map(view_load, views.values()))
    for names, groups_ in loaded:
        tensors = _arrays.torch_groups(groups_, {})
        for name, target in names.items():
            cml.set_param_for_module(model, target, tensors[name], loading_info, None)
    viewed = time.perf_counter()

    # 4. What weightlift does not handle, as transformers does it.
    for group in stock:
        _stock(group, model, loading_info, cml)
    log.debug(
        "weightlift: %d parameters: planned in %.3f s; %d filled in place (%d of them "
        "assembled from the files' pages) in %.3f s; %d views in %.3f s; %d by transformers "
        "in %.3f s",
        len(groups),
        planned - start,
        len(made),
        len(assembled),
        filled - planned,
        sum(len(n) for _, n in views.values()),
        viewed - filled,
        len(stock),
        time.perf_counter() - viewed,
    )

    model._weight_conversions = [c for c in weight_mapping if c.was_used()]
    return loading_info, disk_offload_index




# Numbers that are whole components of a key (`layers.3.`), not part of a name (`w2`).
_DIGITS = re.compile(r"(?:(?<=\.)|^)\d+(?=\.|$)")


def _natural_key(s):
    """transformers' ``dot_natural_key`` (the order its loading sorts keys in), computed in
    one pass per part: digits numerically, text with a numeric suffix by text then number."""
    parts = []
    for part in s.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
        else:
            text = part.rstrip("0123456789")
            if len(text) != len(part):
                parts.append((1, text, int(part[len(text):])))
            else:
                parts.append((1, text))
    return parts


class _Renamer:
    """transformers' ``rename_source_key`` (and its fallback for keys of the model itself),
    remembered per key shape: keys that differ only in their numbers (`layers.3.experts.17`)
    rename alike, so the renaming of one is reused for the others, numbers substituted (those
    the renamed key keeps). A shape is trusted once two more of its keys renamed exactly as
    substitution predicts, and only for renamed keys the model has; one that does not is
    always renamed by transformers itself."""

    def __init__(self, cml, renamings, converters, base_model_prefix, meta):
        self.cml, self.renamings, self.converters = cml, renamings, converters
        self.base_model_prefix, self.meta = base_model_prefix, meta
        # shape -> (renamed shape, source pattern, confirmed) or None (do not guess)
        self.shapes = {}

    def exact(self, key):
        cml = self.cml
        renamed, pattern = cml.rename_source_key(
            key, self.renamings, self.converters, self.base_model_prefix, self.meta
        )
        if renamed not in self.meta and key in self.meta:
            renamed, pattern = cml.rename_source_key(
                key, [], [], base_model_prefix=self.base_model_prefix, meta_state_dict=self.meta
            )
        return renamed, pattern

    @staticmethod
    def shape(key):
        numbers = _DIGITS.findall(key)
        return _DIGITS.sub("#", key), numbers

    def __call__(self, key, shape_numbers=None):
        shape, numbers = shape_numbers or self.shape(key)
        known = self.shapes.get(shape, False)
        if known is None or not numbers:
            return self.exact(key)
        if known is not False:
            template, picks, pattern, confirmed = known
            guess = _fill(template, [numbers[i] for i in picks])
            if confirmed >= 2 and guess in self.meta:
                return guess, pattern
            renamed = self.exact(key)
            if confirmed < 2:
                ok = renamed == (guess, pattern)
                self.shapes[shape] = (template, picks, pattern, confirmed + 1) if ok else None
            return renamed
        renamed, pattern = self.exact(key)
        r_shape, r_numbers = self.shape(renamed)
        # Which of the key's numbers the renamed key carries, in order (the expert index of a
        # fused parameter's sources is dropped, the layer index kept).
        picks, at = [], 0
        for n in r_numbers:
            while at < len(numbers) and numbers[at] != n:
                at += 1
            if at == len(numbers):
                picks = None
                break
            picks.append(at)
            at += 1
        self.shapes[shape] = None if picks is None else (r_shape, picks, pattern, 0)
        return renamed, pattern


def _fill(template, numbers):
    """`template` with its `#`s replaced by `numbers`, in order."""
    it = iter(numbers)
    return re.sub(r"(?:(?<=\.)|^)#(?=\.|$)", lambda _: next(it), template)


class _Unhandled(Exception):
    """This parameter goes to transformers' own conversion (the message says why)."""


_FLOATS = ("F16", "BF16", "F32")


def _info(owner, name):
    code, shape = _open.native(owner).info(name)
    return code, list(shape)


def _target_dtype(group, code, torch):
    """The parameter's torch dtype, and whether reading converts (F16/BF16/F32 only)."""
    from ._arrays import torch_dtype

    source = torch_dtype(code)
    want = group.dtype if group.dtype is not None else source
    if want != source:
        from ._place import dtype_code

        try:
            to = dtype_code(want)
        except Exception:  # noqa: BLE001 (no safetensors code: not ours to convert)
            raise _Unhandled(f"a cast from {code} to {want}") from None
        if code not in _FLOATS or to not in _FLOATS:
            raise _Unhandled(f"a cast from {code} to {want}")
    return want


def _plan(group, model, torch, device):
    """("view", (owner, name)) or ("fill", [(target, tensor, [(owner, name, index, dest)])]):
    parameters allocated once on `device` ("cpu" or "cuda:N") and filled by placements; views
    of the files only on the CPU."""
    from ._place import Block

    def empty(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=device)

    sources = [(p, k, _open.source(v), i) for p, k, v, i in group.entries]
    if group.converter is None:
        (_, _, (owner, name), _), = sources
        code, shape = _info(owner, name)
        want = _target_dtype(group, code, torch)
        from ._arrays import torch_dtype

        if want == torch_dtype(code) and device == "cpu":
            return "view", (owner, name)
        tensor = empty(shape, want)
        return "fill", [(group.key, tensor, [(owner, name, None, tensor)])]

    converter = group.converter
    if converter.quantization_operation is not None or getattr(converter, "distributed_operation", None):
        raise _Unhandled("a quantization or distributed operation")
    if any("\\1" in t for t in converter.target_patterns):
        raise _Unhandled("target patterns with capturing groups")
    from transformers import core_model_loading as cml

    Chunk, Concatenate, MergeModulelist = cml.Chunk, cml.Concatenate, cml.MergeModulelist
    optional = optional_ops(cml)
    # Split came with 5.20, Interleave with 5.24.
    Split, Interleave = optional.get("Split"), optional.get("Interleave")

    ops = converter.operations
    kinds = [type(op) for op in ops]
    by_pattern = {}
    for pattern, _, src, _ in sources:
        by_pattern.setdefault(pattern, []).append(src)
    # The order transformers concatenates in: the converter's source patterns.
    patterns = [p for p in converter.source_patterns if p in by_pattern]
    infos = {p: [_info(o, n) for o, n in by_pattern[p]] for p in patterns}
    codes = {c for p in patterns for c, _ in infos[p]}
    if len(codes) != 1:
        raise _Unhandled(f"tensors of several dtypes {sorted(codes)}")
    code = codes.pop()
    want = _target_dtype(group, code, torch)
    for p in patterns:
        if len({tuple(s) for _, s in infos[p]}) != 1:
            raise _Unhandled(f"tensors of unlike shapes for {p}")

    if kinds in ([MergeModulelist], [MergeModulelist, Concatenate]) and ops[0].dim == 0:
        if kinds == [MergeModulelist] and len(patterns) != 1:
            raise _Unhandled("a merge of several patterns without a concatenation")
        cat = ops[1].dim if len(ops) == 2 else None
        stacked = {p: [len(by_pattern[p])] + infos[p][0][1] for p in patterns}
        shape = _cat_shape([stacked[p] for p in patterns], cat)
        tensor = empty(shape, want)
        whole = Block.of(tensor)
        blocks, at = [], 0
        for p in patterns:
            part = whole if cat is None else whole.narrow(cat, at, stacked[p][cat])
            at += 0 if cat is None else stacked[p][cat]
            for i, (owner, name) in enumerate(by_pattern[p]):
                blocks.append((owner, name, None, part.index(i)))
        return "fill", [(_final_name(group.key, converter.target_patterns[0], converter.target_patterns[0]), tensor, blocks)]

    if kinds == [Concatenate]:
        if any(len(by_pattern[p]) != 1 for p in patterns):
            raise _Unhandled("a concatenation of lists")
        cat = ops[0].dim
        shape = _cat_shape([infos[p][0][1] for p in patterns], cat)
        tensor = empty(shape, want)
        whole = Block.of(tensor)
        blocks, at = [], 0
        for p in patterns:
            size = infos[p][0][1][cat]
            (owner, name), = by_pattern[p]
            blocks.append((owner, name, None, whole.narrow(cat, at, size)))
            at += size
        return "fill", [(_final_name(group.key, converter.target_patterns[0], converter.target_patterns[0]), tensor, blocks)]

    if kinds in ([Chunk], [Split]) and len(patterns) == 1 and len(by_pattern[patterns[0]]) == 1:
        (owner, name), = by_pattern[patterns[0]]
        shape = infos[patterns[0]][0][1]
        dim = ops[0].dim
        if dim < 0:
            dim += len(shape)
        if kinds == [Chunk]:
            targets = ops[0].get_target_patterns(converter.target_patterns, config=model.config)
            if shape[dim] % len(targets):
                raise _Unhandled("a chunk of unequal parts")
            sizes = [shape[dim] // len(targets)] * len(targets)
        else:
            targets = converter.target_patterns
            sizes = [
                model.get_parameter(group.key.replace(targets[0], t)).shape[dim] for t in targets
            ]
            if sum(sizes) != shape[dim]:
                raise _Unhandled("a split whose parts do not add up")
        out, at = [], 0
        for target, size in zip(targets, sizes):
            part = list(shape)
            part[dim] = size
            tensor = empty(part, want)
            index = tuple([slice(None)] * dim + [slice(at, at + size)])
            out.append((_final_name(group.key, targets[0], target), tensor, [(owner, name, index, tensor)]))
            at += size
        return "fill", out

    if Interleave is not None and kinds == [Interleave] and (
        len(patterns) == 1 and len(by_pattern[patterns[0]]) == 1
    ):
        # Rows interleaved in the file ([g0, u0, g1, u1, ...]) into halves: the tensor is
        # allocated once and filled by one placement through a view (`Block.interleaved`).
        # (Followed by a Chunk, transformers makes each part a tensor of its own: one
        # placement cannot fill two, so that stays transformers'.)
        (owner, name), = by_pattern[patterns[0]]
        shape = infos[patterns[0]][0][1]
        dim = ops[0].dim + (len(shape) if ops[0].dim < 0 else 0)
        if shape[dim] % 2 or dim == len(shape) - 1:
            raise _Unhandled("an interleaving of an odd or innermost dimension")
        tensor = empty(shape, want)
        place = Block.of(tensor).interleaved(dim, inverse=getattr(ops[0], "inverse", False))
        first = converter.target_patterns[0]
        return "fill", [(_final_name(group.key, first, first), tensor, [(owner, name, None, place)])]

    raise _Unhandled(f"conversion operations {[k.__name__ for k in kinds]}")


def _assemble(placed, torch):
    """{position in `placed`: tensor} for the placements (see `_plan`) whose tensor is made
    of whole checkpoint tensors, unconverted and side by side (C-contiguous blocks),
    assembled from the files' pages (``_native.assemble``: no copy into fresh memory, the
    costliest part of filling a fused parameter). Those whose files are read rather than
    mapped, or that cannot be assembled otherwise, are left out: filled as planned."""
    from . import _native
    from ._arrays import contiguous_strides, torch_base, torch_dtype
    from ._place import Block

    jobs, positions = [], []
    for i, (_, tensor, blocks) in enumerate(placed):
        size = tensor.element_size()
        pieces = []
        for owner, name, index, dest in blocks:
            if index is not None or not isinstance(dest, Block) or dest.regroups or dest.base is not tensor:
                break
            code, shape = _info(owner, name)
            if torch_dtype(code) != tensor.dtype or list(shape) != list(dest.shape):
                break
            if tuple(dest.strides) != contiguous_strides(tuple(dest.shape)):
                break
            pieces.append((_open.native(owner), name, dest.offset * size))
        else:
            if pieces:
                jobs.append((tensor.numel() * size, size, pieces))
                positions.append(i)
    if not jobs:
        return {}
    memories, mapped, copied = _native.assemble(jobs)
    out = {}
    for i, memory in zip(positions, memories):
        if memory is not None:
            tensor = placed[i][1]
            out[i] = torch_base(memory).view(tensor.dtype).view(tensor.shape)
    log.debug(
        "weightlift: %d of %d parameters assembled: %d bytes mapped from the files, %d copied",
        len(out), len(jobs), mapped, copied,
    )
    return out


def _cat_shape(shapes, dim):
    """The shape of `shapes` concatenated along `dim` (None: the one shape)."""
    if dim is None:
        (shape,) = shapes
        return list(shape)
    first = list(shapes[0])
    for s in shapes[1:]:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != dim):
            raise _Unhandled(f"a concatenation of shapes {[list(x) for x in shapes]}")
    first[dim] = sum(s[dim] for s in shapes)
    return first


def _final_name(layer_name, first_target, target):
    """The parameter name transformers gives `target` (its prefix and suffix around the first
    target pattern in the group's key, as ``WeightConverter.convert`` names its outputs)."""
    full = layer_name.replace("*.", "0.") if "*." in layer_name else layer_name
    if first_target in full:
        prefix, _, suffix = full.partition(first_target)
        return prefix + target + suffix
    if target in full:
        prefix, _, suffix = full.partition(target)
        return prefix + target + suffix
    raise _Unhandled(f"cannot name {target} from {layer_name}")


def _stock(group, model, loading_info, cml):
    """One parameter through transformers' own conversion (what its loop does per key)."""
    if group.converter is not None:
        mapping = copy.deepcopy(group.converter)
    else:
        mapping = cml.WeightRenaming(group.original, group.key)
    for pattern, original_key, value, index in group.entries:
        job = cml.spawn_materialize(None, value, group.device, group.dtype, tensor_idx=index)
        mapping.add_tensor(group.key, original_key, pattern, job)
    try:
        realized = mapping.convert(
            group.key,
            model=model,
            config=model.config,
            hf_quantizer=None,
            loading_info=loading_info,
        )
        for target_name, param in realized.items():
            param = param[0] if isinstance(param, list) else param
            cml.set_param_for_module(model, target_name, param, loading_info, None)
    except cml.SkipParameters:
        pass
