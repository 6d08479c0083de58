"""Early reads: a checkpoint's files read into the page cache on a thread of their own while
the caller does other work first. transformers' ``from_pretrained`` and vLLM's loader both
build the whole model (hundreds of milliseconds for a large MoE) before they open a file;
the read overlaps that work. Only local safetensors files that fit the prefetch window and are
not cached already are read (see ``weightlift::Checkpoint::warm``)."""

import threading


class EarlyRead:
    """The early read of the checkpoint at `path` (a directory, an index or a file): opened
    and started on a thread of its own (opening reads every header, and checking what is
    cached already takes a few milliseconds per file: the caller goes on meanwhile), called
    off by ``close``. `log`: the logger its debug lines go to; `memory_budget` and
    `prefetch_window`: the caller's (``weightlift._handle.open_handle``'s), whose window the
    checkpoint must fit."""

    def __init__(self, path, log, memory_budget=None, prefetch_window=None):
        self._handle, self._closed, self._lock = None, False, threading.Lock()
        self._started, self._active = threading.Event(), False
        self._log = log
        budget = dict(memory_budget=memory_budget, prefetch_window=prefetch_window)
        threading.Thread(target=self._start, args=(path, budget), daemon=True).start()

    def _start(self, path, budget):
        from . import _handle

        try:
            try:
                handle = _handle.open_handle(path, **budget)
            except Exception as e:  # noqa: BLE001 (the caller's own reads report the problems)
                self._log.debug("weightlift: no early read of %s: %s", path, e)
                return
            with self._lock:
                if self._closed:
                    return
                self._handle = handle
            self._active = handle.warm()
            self._log.debug(
                "weightlift: early read of %s: %s", path, "started" if self._active else "not needed"
            )
        finally:
            self._started.set()

    def active(self):
        """Whether any file is being read (waits for the read to have started or been
        decided against: the few milliseconds of opening)."""
        self._started.wait()
        return self._active

    def wait(self, path):
        """Waits until the read has brought in all it will of the file at `path` (at once
        where it does not read that file, or was called off): for a reader of the whole file
        on a handle of its own, which beside the early read would split both reads'
        requests."""
        self._started.wait()
        with self._lock:
            handle = self._handle
        if handle is not None:
            handle.wait_warm(path)

    def close(self):
        """Calls the rest of the read off (what was read stays in the page cache)."""
        with self._lock:
            self._closed = True
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
