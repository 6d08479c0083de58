"""Drop-in for ``safetensors.torch``'s loading functions (tensors through DLPack)."""

from . import load as _load
from . import load_file as _load_file


def load_file(filename, device="cpu", backend="auto"):
    """Loads a safetensors file into torch tensors; ``device="cuda:N"`` loads straight to
    the GPU."""
    return _load_file(filename, device=device, framework="pt", backend=backend)


def load(data):
    """Loads a safetensors file held in bytes into torch tensors."""
    return _load(data, framework="pt")
