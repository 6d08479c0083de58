"""The one sample every timing child of ``cargo xtask bench`` (and ``bench-dist``) prints: a
JSON object on the last line of its output (``secs``, ``peak_rss`` in bytes, and whatever else
the child measured, e.g. ``read_bytes``)."""

import json
import resource


def emit(secs, **extra):
    """Prints the sample: `secs` timed, this process's peak resident memory, and `extra`."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"secs": secs, "peak_rss": peak, **extra}), flush=True)
