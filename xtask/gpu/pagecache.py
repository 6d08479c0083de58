"""Page-cache residency (mincore) and eviction (posix_fadvise), shared by run.py and
gpu_tasks.py; no third-party imports, so run.py stays light."""

import ctypes
import mmap
import os


def cached_fraction(paths):
    """Share of the files' pages in the page cache, or None where mincore fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        with open(p, "rb") as f:
            # A private mapping: mincore reports the file's pages without faulting them in.
            m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            buf = ctypes.c_char.from_buffer(m)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
            del buf
            if rc != 0:
                return None
            resident += sum(v & 1 for v in bytes(vec))
            total += pages
        finally:
            m.close()
    return resident / total if total else 0.0


def evict(paths):
    """Drops the files from the page cache; returns the share still cached (1.0 on tmpfs,
    and wherever the kernel ignores the advice)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached_fraction(paths)
