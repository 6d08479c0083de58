"""vLLM: ``LLM(model=..., load_format="weightlift")``.

Registered through vLLM's plugin entry point (``vllm.general_plugins``), which vLLM loads in
every one of its processes (the engine's workers included); does nothing where vLLM is not
installed. The loader is vLLM's default one (model resolution, downloads, expert-parallel
filters, weight tracking, ``model.load_weights``) with weightlift reading the safetensors
files: every shard opened at once, read through the process's prefetch window (populated
mappings on local disks, large reads into memory of its own on network filesystems, URLs
and ``hf://``), never more than the window ahead of vLLM's own ``load_weights`` and within
the memory budget, in file order. Tensors are handed to vLLM's weight loaders as the default
loader hands them.

Options, through ``model_loader_extra_config``:

- ``memory_budget``: bytes (or a size, ``"8GiB"``) the loads may hold; default the memory
  available to the process (see ``weightlift.memory_budget()``).
- ``prefetch_window``: how far reads run ahead of vLLM's consumption (default: half the
  budget).
- ``copy``: read into memory of weightlift's own even where files could be mapped.
- ``threads``: threads of the loads of shards prefetched whole (network filesystems).
- ``drop_cache``: drop the page-cache pages of what was handed over (hosts with less memory
  than the model).

The rest of ``model_loader_extra_config`` goes to vLLM's default loader.
"""

import os

LOAD_FORMAT = "weightlift"
OPTIONS = ("memory_budget", "prefetch_window", "copy", "threads", "drop_cache")


def register():
    """vLLM's plugin entry point: registers ``load_format="weightlift"``."""
    try:
        from vllm.model_executor.model_loader import register_model_loader
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    except ImportError:  # no vLLM: nothing to register
        return
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    if LOAD_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:
        register_model_loader(LOAD_FORMAT)(_loader(DefaultModelLoader))


def _size(value):
    if value is None or isinstance(value, int):
        return value
    from ._native import parse_size

    return parse_size(str(value))


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

        def _prepare_weights(self, *args, **kwargs):
            # The files are found as for load_format="safetensors".
            saved = self.load_config.load_format
            self.load_config.load_format = "safetensors"
            try:
                return super()._prepare_weights(*args, **kwargs)
            finally:
                self.load_config.load_format = saved

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
            if source.is_unused_weight is not None:
                from vllm.model_executor.model_loader.weight_utils import (
                    filter_safetensors_files_by_weight_name,
                )

                files = filter_safetensors_files_by_weight_name(files, source.is_unused_weight)
            if self.counter_before_loading_weights == 0.0:
                import time

                self.counter_before_loading_weights = time.perf_counter()
            weights = iterate(files, self.weightlift, self.local_expert_ids)
            return ((source.prefix + name, tensor) for name, tensor in weights)

    return WeightliftModelLoader


def _natural(path):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", os.path.basename(path))]


def _checkpoints(files):
    """What to open for `files`: their directory as one checkpoint where its index lists them
    all (weightlift then checks the index against every shard: a shard missing from the
    directory is an error naming it), with the tensors of the files to read; else each file."""
    import json

    folder = os.path.dirname(files[0])
    index = os.path.join(folder, "model.safetensors.index.json")
    wanted = {os.path.basename(f) for f in files}
    if all(os.path.dirname(f) == folder for f in files) and os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        if wanted <= set(weight_map.values()):
            return [(folder, {n for n, file in weight_map.items() if file in wanted})]
    return [(f, None) for f in sorted(files, key=_natural)]


def iterate(files, options, local_expert_ids=None):
    """(name, torch tensor) of every tensor of `files`, shard by shard in file order: every
    shard opened at once and prefetched through the process's window."""
    from ._open import safe_open

    skip = None
    if local_expert_ids is not None:
        from vllm.model_executor.model_loader.weight_utils import should_skip_weight

        def skip(name):
            return should_skip_weight(name, local_expert_ids)

    backend = "pread" if options.get("copy") else "auto"
    handles = [
        (
            safe_open(
                path,
                "pt",
                backend=backend,
                prefetch=True,
                drop_cache=bool(options.get("drop_cache", False)),
                memory_budget=_size(options.get("memory_budget")),
                prefetch_window=_size(options.get("prefetch_window")),
                threads=options.get("threads"),
            ),
            names,
        )
        for path, names in _checkpoints(files)
    ]
    try:
        # Every shard's prefetch starts now: the window orders and bounds them.
        for h, _ in handles:
            h._start_prefetch()
        for h, names in handles:
            for name in h.offset_keys():
                if (names is not None and name not in names) or (skip is not None and skip(name)):
                    continue
                yield name, h.get_tensor(name)
    finally:
        for h, _ in handles:
            h.__exit__(None, None, None)
