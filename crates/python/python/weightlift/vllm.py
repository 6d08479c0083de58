"""vLLM: ``LLM(model=..., load_format="weightlift")``.

Registered through vLLM's plugin entry point (``vllm.general_plugins``), which vLLM loads in
every one of its processes (the engine's workers included); does nothing where vLLM is not
installed. The loader is vLLM's default one (model resolution, downloads, expert-parallel
filters, weight tracking, ``model.load_weights``) with weightlift reading the safetensors
files: every shard opened at once, read through the process's prefetch window (populated
mappings on local disks, large reads into memory of its own on network filesystems, URLs
and ``hf://``), never more than the window ahead of vLLM's own ``load_weights`` and within
the memory budget, in file order.

By default vLLM's parameters are filled straight from the files, where vLLM's own weight
loaders say (see ``weightlift._vllm_place``): the loaders are handed placeholders, their
copies into the parameters are recorded as placements, and one planned load per file fills
them, files loading in the background while vLLM records the next; a use of a tensor that is
not a view or a copy goes the default way. ``place=False`` hands the loaders real tensors
instead, read as above.

Options, through ``model_loader_extra_config``:

- ``memory_budget``: bytes (or a size, ``"8GiB"``) the loads may hold; default the memory
  available to the process (see ``weightlift.memory_budget()``).
- ``prefetch_window``: how far reads run ahead of vLLM's consumption (default: half the
  budget).
- ``copy``: read into memory of weightlift's own even where files could be mapped.
- ``threads``: threads of the loads of shards prefetched whole (network filesystems).
- ``drop_cache``: drop the page-cache pages of what was handed over (hosts with less memory
  than the model; with ``place=False``).
- ``place``: fill the parameters straight from the files (default True).

The rest of ``model_loader_extra_config`` goes to vLLM's default loader.
"""

import os

LOAD_FORMAT = "weightlift"
OPTIONS = ("memory_budget", "prefetch_window", "copy", "threads", "drop_cache", "place", "assemble")

_LOADER = "vllm.model_executor.model_loader"
_DEFAULT = f"{_LOADER}.default_loader:DefaultModelLoader"
# vLLM internals the loader relies on (see `weightlift._surface` for the kinds), checked when
# it registers: where one is missing or changed, `load_format="weightlift"` is still
# registered, and fails naming it when a user asks for it.
SURFACE = (
    (f"{_LOADER}:register_model_loader", "call", ("load_format",)),
    (f"{_LOADER}:_LOAD_FORMAT_TO_MODEL_LOADER", "present", None),
    (_DEFAULT, "present", None),
    (f"{_DEFAULT}._prepare_weights", "call",
     ("self", "model_name_or_path", "subfolder", "revision", "fall_back_to_pt",
      "allow_patterns_overrides")),
    (f"{_DEFAULT}._get_weights_iterator", "call", ("self", "source")),
    (f"{_DEFAULT}.get_all_weights", "call", ("self", "model_config", "model")),
    (f"{_DEFAULT}.Source", "fields",
     ("model_or_path", "revision", "subfolder", "prefix", "fall_back_to_pt",
      "allow_patterns_overrides")),
    (f"{_DEFAULT}.counter_before_loading_weights", "present", None),
    (f"{_LOADER}.weight_utils:should_skip_weight", "call", ("weight_name", "local_expert_ids")),
    (f"{_LOADER}.weight_utils:filter_mm_encoder_only_safetensors_files", "call",
     ("hf_weights_files", "hf_folder", "index_file", "language_model_prefixes")),
)
# Where the default loader's `Source` names a model's unused weights (vLLM 0.32 on; 0.31 has
# neither the field nor the filter), the files holding only those are left out as vLLM's
# default loader leaves them out, with its own filter: checked only where the field is there.
UNUSED_WEIGHTS = (
    (f"{_LOADER}.weight_utils:filter_safetensors_files_by_weight_name", "call",
     ("hf_weights_files", "is_unused_weight")),
)


def surface_problem():
    """The first internal of vLLM's that the loader relies on and this vLLM lacks (or has
    changed), as "name why", or None."""
    from . import _surface

    problem = _surface.problem(SURFACE, _surface.importer)
    if problem is None and _names_unused_weights():
        problem = _surface.problem(UNUSED_WEIGHTS, _surface.importer)
    return problem


def _names_unused_weights():
    """Whether this vLLM's default loader's `Source` has the field `is_unused_weight`."""
    import dataclasses

    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    fields = dataclasses.fields(DefaultModelLoader.Source)
    return any(f.name == "is_unused_weight" for f in fields)


def register():
    """vLLM's plugin entry point: registers ``load_format="weightlift"``."""
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError:  # no vLLM: nothing to register
        return
    try:
        from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER
    except ImportError:
        _LOAD_FORMAT_TO_MODEL_LOADER = {}
    if LOAD_FORMAT in _LOAD_FORMAT_TO_MODEL_LOADER:
        return
    problem = surface_problem()
    if problem is not None:
        try:
            loader = _unavailable(problem)
        except ImportError:  # not even a base class to say it with
            import logging

            logging.getLogger("weightlift.vllm").error(
                "weightlift: load_format='weightlift' is not registered: this vLLM's loader "
                "relies on %s",
                problem,
            )
            return
        register_model_loader(LOAD_FORMAT)(loader)
        return
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    register_model_loader(LOAD_FORMAT)(_loader(DefaultModelLoader))


def _unavailable(problem):
    """A loader that refuses to load, naming what this vLLM lacks."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class WeightliftUnavailable(BaseModelLoader):
        def __init__(self, load_config):
            import vllm

            raise RuntimeError(
                f"load_format='weightlift' cannot run on vLLM {getattr(vllm, '__version__', '?')}: "
                f"its loader relies on {problem}. Use another load_format, or a vLLM and "
                "weightlift that match (see weightlift's README, 'vLLM')."
            )

        def download_model(self, model_config):  # pragma: no cover (never built)
            raise NotImplementedError

        def load_weights(self, model, model_config):  # pragma: no cover
            raise NotImplementedError

    return WeightliftUnavailable


def _loader(DefaultModelLoader):
    import dataclasses

    class WeightliftModelLoader(DefaultModelLoader):
        """vLLM's default loader, reading safetensors checkpoints through weightlift."""

        def __init__(self, load_config):
            extra = dict(load_config.model_loader_extra_config or {})
            ours = {k: extra.pop(k) for k in list(extra) if k in OPTIONS}
            try:
                load_config = dataclasses.replace(load_config, model_loader_extra_config=extra)
            except TypeError:
                load_config.model_loader_extra_config = extra
            super().__init__(load_config)
            self.weightlift = ours

        def load_model(self, vllm_config, model_config, *args, **kwargs):
            # The files start coming into the page cache while vLLM builds the model.
            self._weightlift_early = _early_read(self, vllm_config, model_config)
            try:
                return super().load_model(vllm_config, model_config, *args, **kwargs)
            finally:
                early, self._weightlift_early = self._weightlift_early, None
                if early is not None:
                    early.close()

        def _prepare_weights(self, *args, **kwargs):
            # The files are found as for load_format="safetensors".
            saved = self.load_config.load_format
            self.load_config.load_format = "safetensors"
            try:
                return super()._prepare_weights(*args, **kwargs)
            finally:
                self.load_config.load_format = saved

        def get_all_weights(self, model_config, model):
            # The model, whose parameters made of the files' pages take their new memory.
            self._weightlift_model = model
            try:
                yield from super().get_all_weights(model_config, model)
            finally:
                self._weightlift_model = None

        def _get_weights_iterator(self, source):
            folder, files, use_safetensors, index = self._prepare_weights(
                source.model_or_path,
                source.subfolder,
                source.revision,
                source.fall_back_to_pt,
                source.allow_patterns_overrides,
            )
            if not use_safetensors:
                raise RuntimeError(
                    f"load_format='weightlift' reads safetensors checkpoints; "
                    f"{source.model_or_path} has none"
                )
            files = self._encoder_only(folder, files, index, source)
            if getattr(source, "is_unused_weight", None) is not None:
                from vllm.model_executor.model_loader.weight_utils import (
                    filter_safetensors_files_by_weight_name,
                )

                files = filter_safetensors_files_by_weight_name(files, source.is_unused_weight)
            if self.counter_before_loading_weights == 0.0:
                import time

                self.counter_before_loading_weights = time.perf_counter()
            if self.weightlift.get("place", True):
                model = getattr(self, "_weightlift_model", None)
                params = None
                if model is not None and self.weightlift.get("assemble", True):
                    params = model.parameters
                early = getattr(self, "_weightlift_early", None)
                weights = place(files, self.weightlift, self.local_expert_ids, params, early)
            else:
                weights = iterate(files, self.weightlift, self.local_expert_ids)
            return ((source.prefix + name, tensor) for name, tensor in weights)

        def _encoder_only(self, folder, files, index, source):
            # A multimodal model run encoder-only (`--mm-encoder-only`): the files holding
            # only the language model's weights are left out, as vLLM's default loader does.
            prefixes = getattr(self, "_encoder_only_lm_prefixes", None)
            if prefixes is None or not files:
                return files
            from vllm.model_executor.model_loader.weight_utils import (
                filter_mm_encoder_only_safetensors_files,
            )

            kept = filter_mm_encoder_only_safetensors_files(
                files,
                folder,
                index,
                prefixes,
                weights_mapper=getattr(self, "_encoder_only_weights_mapper", None),
            )
            if not kept:
                raise RuntimeError(
                    f"load_format='weightlift': the encoder-only filter left no file of "
                    f"{source.model_or_path} (language model prefixes {prefixes})"
                )
            return kept

    return WeightliftModelLoader


def _early_read(loader, vllm_config, model_config):
    """The early read of the checkpoint vLLM is about to load (see ``weightlift._early``),
    started before the model is built; None where the placements do not run (option
    ``place: false`` reads each file as vLLM comes to it), where experts are split among
    ranks (the other ranks' experts are never read), or where the checkpoint is not a local
    directory. The checkpoint must fit the window of the loader's `memory_budget` and
    `prefetch_window` options (see ``weightlift::Checkpoint::warm``)."""
    import logging

    from . import _early

    if not loader.weightlift.get("place", True):
        return None
    parallel = getattr(vllm_config, "parallel_config", None)
    if getattr(parallel, "enable_expert_parallel", False):
        return None
    path = getattr(model_config, "model", None)
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    return _early.EarlyRead(
        path,
        logging.getLogger("weightlift.vllm"),
        memory_budget=loader.weightlift.get("memory_budget"),
        prefetch_window=loader.weightlift.get("prefetch_window"),
    )


def _natural(path):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", os.path.basename(path))]


def _skip(local_expert_ids):
    """Whether a tensor belongs to another rank's experts (expert parallelism): not read."""
    if local_expert_ids is None:
        return None
    from vllm.model_executor.model_loader.weight_utils import should_skip_weight

    def skip(name):
        return should_skip_weight(name, local_expert_ids)

    return skip


def place(files, options, local_expert_ids=None, params=None, early=None):
    """(name, tensor) of every tensor of `files`, file by file in file order, views of
    mappings nothing reads, whose copies into vLLM's parameters are placements (see
    ``weightlift._vllm_place``): each file's placements load as soon as its last tensor was
    handed over (and `early`, an early read of the files, is through with it), in the
    background; the last step waits for all."""
    import logging
    import time
    from concurrent.futures import ThreadPoolExecutor

    from . import _args, _gc, _handle, _vllm_place

    skip = _skip(local_expert_ids)
    files = sorted(files, key=_natural)
    copy = bool(options.get("copy"))
    budget = _args.size(options.get("memory_budget"))
    window = _args.size(options.get("prefetch_window"))

    def open_handle(path):
        return _handle.open_handle(
            path,
            "pread" if copy else "auto",
            copy,
            memory_budget=budget,
            prefetch_window=window,
        )

    # The files' loads run beside vLLM's own Python loop, which keeps a core busy: two files
    # at a time, sharing the other cores (one thread each on two cores: once the loop is
    # done, the last files' loads have both).
    workers = 2
    threads = options.get("threads") or max(1, ((os.cpu_count() or 2) - 1) // workers)
    start = time.perf_counter()
    with _gc.frozen(), ThreadPoolExecutor(max_workers=workers) as pool:
        source = _vllm_place.Source(
            open_handle, threads=threads, pool=pool, params=params, early=early
        )
        yield from source.weights(files, skip)
    logging.getLogger("weightlift.vllm").info(
        "weightlift: %d copies into vLLM's parameters placed straight from %d files "
        "(%d parameters assembled from the files' pages), "
        "%d tensors went vLLM's default way, in %.3f s",
        source.placed,
        len(files),
        source.assembled,
        len(source.defaults),
        time.perf_counter() - start,
    )


def iterate(files, options, local_expert_ids=None):
    """(name, torch tensor) of every tensor of `files`, file by file in file order. Each file
    is one planned load (mapped and populated in parallel on local disks, read into memory of
    weightlift's own elsewhere, within the memory budget and window), the next file's load
    running in the background while vLLM copies this one's tensors into its parameters."""
    from concurrent.futures import ThreadPoolExecutor

    from . import _args, _arrays, _gc, _handle

    skip = _skip(local_expert_ids)
    backend = "pread" if options.get("copy") else "auto"
    threads = options.get("threads")
    drop_cache = bool(options.get("drop_cache", False))
    files = sorted(files, key=_natural)
    # The one memory policy: the budget and window every file's load runs under.
    budget = _args.size(options.get("memory_budget"))
    window = _args.size(options.get("prefetch_window"))

    def load(path):
        handle = _handle.open_handle(
            path,
            backend,
            bool(options.get("copy")),
            memory_budget=budget,
            prefetch_window=window,
        )
        names = None
        if skip is not None:
            names = {n for n in handle.offset_keys() if not skip(n)}
        groups, _ = handle.load(
            layout=_args.layout("pt"), threads=threads, drop_cache=drop_cache, names=names
        )
        return groups

    import logging
    import time

    # Files loading ahead of vLLM: as many as the prefetch window holds (up to 3), so that a
    # network filesystem serves several at once, at least the next one.
    from ._native import memory_budget

    largest = max((os.path.getsize(f) for f in files), default=1)
    if window is None:
        window = budget // 2 if budget is not None else memory_budget()[1]
    depth = max(1, min(3, window // max(largest, 1)))
    waited, start = 0.0, time.perf_counter()
    with _gc.frozen(), ThreadPoolExecutor(max_workers=depth) as pool:
        ahead = [pool.submit(load, f) for f in files[:depth]]
        for i in range(len(files)):
            t = time.perf_counter()
            groups = ahead.pop(0).result()
            waited += time.perf_counter() - t
            if i + depth < len(files):
                ahead.append(pool.submit(load, files[i + depth]))
            tensors = _arrays.torch_groups(groups, {})
            del groups
            for name in list(tensors):
                yield name, tensors.pop(name)
    logging.getLogger("weightlift.vllm").debug(
        "weightlift: %d files read in %.3f s, vLLM waited %.3f s for them",
        len(files),
        time.perf_counter() - start,
        waited,
    )
