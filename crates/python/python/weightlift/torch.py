"""Drop-in for ``safetensors.torch``'s loading functions."""

from ._load import load as _load
from ._load import load_file as _load_file


def load_file(filename, device="cpu", *, backend="auto", copy=False):
    """Loads a safetensors file into torch tensors; ``device="cuda:N"`` loads straight to
    the GPU. On a local disk the tensors are views of a private mapping of the file (see
    ``weightlift``'s docs; ``copy=True`` for memory of their own)."""
    return _load_file(filename, device=device, framework="pt", backend=backend, copy=copy)


def load(data):
    """Loads a safetensors file held in bytes into torch tensors."""
    return _load(data, framework="pt")
