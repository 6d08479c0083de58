"""The one sample every timing child of ``cargo xtask bench`` prints: a JSON object on the
last line of its output (``secs``, ``peak_rss`` in bytes)."""

import json
import resource


def emit(secs):
    """Prints the sample: `secs` timed, and this process's peak resident memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"secs": secs, "peak_rss": peak}), flush=True)
