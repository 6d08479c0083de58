"""Loads shared by the ranks of a ``torch.distributed`` process group: each rank reads a
byte-balanced, file-contiguous share of the checkpoint (the native side plans it), then the
shares are exchanged with the group's own collectives, broadcast in bounded chunks into the
final buffers, so every rank returns every tensor while the storage is read once.

The same code serves gloo (CPU tensors) and NCCL (device tensors: each rank's share goes
through the staged GPU pipeline, then NCCL broadcasts device memory).

Failure is collective: before any exchange the ranks agree, with one ``all_gather_object``,
that each of them loaded its share and that they all asked for the same load (the same
checkpoint, tensors, dtypes and shapes). A rank that failed or disagrees makes every rank raise
``SafetensorError`` naming it; a rank that died makes the others' collectives fail within
the group's timeout, which is raised the same way, never a hang.
"""

from . import _args, _arrays, _handle, _slicing
from ._native import SafetensorError

# Bytes per broadcast: large enough to keep the transport busy, small enough to bound the
# transport's own buffers.
CHUNK = 64 << 20


def _collective(what, call):
    """Runs a collective; a failure (a peer that died, a timeout) becomes SafetensorError."""
    try:
        return call()
    except SafetensorError:
        raise
    except Exception as e:  # noqa: BLE001 (gloo and NCCL raise RuntimeError, DistBackendError...)
        raise SafetensorError(
            f"{what} failed: {type(e).__name__}: {e} "
            "(did another rank die or time out?)"
        ) from e


def load_shared(path, framework, device, group, backend="auto", token=None, threads=None,
                prefix=None, slices=None, drop_cache=False):
    """The ``StateDict`` of a load of `path` shared by `group`'s ranks (see the module docs):
    ``load_checkpoint(..., group=)``. Shares are read into memory of their own (never
    mapped: the other ranks' spans are written into them). ``drop_cache``: once every rank
    has its tensors, each drops what it read from the page cache."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise SafetensorError(
            "group= needs torch.distributed initialised (init_process_group, or torchrun)"
        )
    if group is True:
        group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if device.startswith("cuda") and dist.get_backend(group) == "gloo":
        raise SafetensorError(
            "a shared load to a GPU exchanges device memory: use an NCCL group, "
            "or load to the cpu with gloo"
        )
    after = {}
    try:
        # Opened and planned here, so that a rank that cannot open the checkpoint fails
        # every rank, never leaves them waiting.
        handle = _handle.open_handle(path, backend, True, token)
        ranges, after = _slicing.plans(handle, slices) if slices is not None else (None, {})
        groups, report, spans, digest, read = handle.load_share(
            rank,
            world,
            device=_args.native_device(device),
            threads=threads,
            prefix=prefix,
            layout=_args.layout(framework),
            slices=ranges,
        )
        status = ("ok", f"{digest:016x}")
    except Exception as e:  # noqa: BLE001 (every rank must hear of it)
        groups = None
        status = ("error", f"{type(e).__name__}: {e}")

    statuses = [None] * world
    _collective(
        "gathering every rank's load status",
        lambda: dist.all_gather_object(statuses, status, group=group),
    )
    failed = [(r, s[1]) for r, s in enumerate(statuses) if s[0] != "ok"]
    if failed:
        lines = "; ".join(f"rank {r}: {why}" for r, why in failed)
        raise SafetensorError(f"the shared load failed on {len(failed)} of {world} ranks: {lines}")
    digests = {s[1] for s in statuses}
    if len(digests) > 1:
        by_rank = ", ".join(f"rank {r}: {s[1]}" for r, s in enumerate(statuses))
        raise SafetensorError(
            "the ranks asked for different loads (checkpoint path, filter or slices differ; "
            f"plan digests {by_rank})"
        )

    bases = [_arrays.torch_base(memory) for memory, _ in groups]
    for owner, allocation, start, end in spans:
        src = dist.get_global_rank(group, owner)
        base = bases[allocation]
        for at in range(start, end, CHUNK):
            part = base[at : min(end, at + CHUNK)]
            _collective(
                f"receiving rank {owner}'s share",
                lambda part=part: dist.broadcast(part, src=src, group=group),
            )
    if drop_cache:
        # Ranks on one host share the page cache: drop only once every rank is done.
        _collective("waiting for every rank before dropping the page cache",
                    lambda: dist.barrier(group=group))
        handle.drop_cache(read)
    out = _handle.StateDict()
    out.report = report
    _handle.arrays(groups, framework, out)
    _slicing.finish_all(out, after)
    return out
