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
# transport's own buffers, and to start the exchange of a host load soon after its reads
# (each rank's first CHUNK bytes are sent while it reads on).
CHUNK = 32 << 20


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


def _agree(status, group, world):
    """Gathers every rank's ``(state, detail)`` status (``"ok"`` with the plan's digest, or
    ``"error"`` with the message); raises ``SafetensorError`` on every rank where any rank
    failed or the ranks asked for different loads."""
    import torch.distributed as dist

    statuses = [None] * world
    _collective(
        "gathering every rank's load status",
        lambda: dist.all_gather_object(statuses, status, group=group),
    )
    failed = [(r, s[1]) for r, s in enumerate(statuses) if s[0] != "ok"]
    if failed:
        lines = "; ".join(f"rank {r}: {why}" for r, why in failed)
        raise SafetensorError(f"the shared load failed on {len(failed)} of {world} ranks: {lines}")
    digests = {s[1] for s in statuses if s[1]}
    if len(digests) > 1:
        by_rank = ", ".join(f"rank {r}: {s[1]}" for r, s in enumerate(statuses))
        raise SafetensorError(
            "the ranks asked for different loads (checkpoint path, filter or slices differ; "
            f"plan digests {by_rank})"
        )


def _send(group, bases, owner, allocation, start, end):
    """Broadcasts bytes ``start..end`` of allocation `allocation` from rank `owner` (of
    `group`) into every other rank's."""
    import torch.distributed as dist

    part = bases[allocation][start:end]
    src = dist.get_global_rank(group, owner)
    _collective(
        f"receiving rank {owner}'s share",
        lambda: dist.broadcast(part, src=src, group=group),
    )


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
    bases = []
    agreed = []

    def check(status):
        """Every rank's status of the load: raises on every rank where any failed."""
        agreed.append(True)
        _agree(status, group, world)

    if device.startswith("cuda"):
        # Device memory: the share is read through the staged pipeline first, then broadcast.
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
            status = ("error", f"{type(e).__name__}: {e}")
        check(status)
        bases = [_arrays.torch_base(memory) for memory, _ in groups]
        for owner, allocation, start, end in spans:
            for at in range(start, end, CHUNK):
                _send(group, bases, owner, allocation, at, min(end, at + CHUNK))
    else:
        # Host memory: the shares are exchanged while they are read, in rounds (each rank's
        # next CHUNK bytes per round): a cold load's reads and the transfers overlap.
        import torch

        loaded = {}

        def begin(groups, report, spans, digest, read):
            check(("ok", f"{digest:016x}"))
            bases.extend(_arrays.torch_base(memory) for memory, _ in groups)
            loaded.update(groups=groups, report=report, read=read)

        def agree(error):
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
            _collective(
                "agreeing that every rank's reads are going well",
                lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group),
            )
            if flag.item():
                _agree(("error", error) if error is not None else ("ok", ""), group, world)

        try:
            handle = _handle.open_handle(path, backend, True, token)
            ranges, after = _slicing.plans(handle, slices) if slices is not None else (None, {})
            handle.load_share_exchanged(
                rank,
                world,
                CHUNK,
                begin,
                agree,
                lambda *piece: _send(group, bases, *piece),
                threads=threads,
                prefix=prefix,
                layout=_args.layout(framework),
                slices=ranges,
            )
        except Exception as e:  # noqa: BLE001 (every rank must hear of it)
            if agreed:
                raise
            check(("error", f"{type(e).__name__}: {e}"))
        groups, report, read = loaded["groups"], loaded["report"], loaded["read"]
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
