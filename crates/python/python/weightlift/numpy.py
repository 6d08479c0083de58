"""Drop-in for ``safetensors.numpy``'s loading functions."""

from ._load import load as _load
from ._load import load_file as _load_file


def load_file(filename, *, backend="auto", copy=False):
    """Loads a safetensors file into numpy arrays (sharing weightlift's memory; see
    ``weightlift``'s docs for mapped files and ``copy=True``)."""
    return _load_file(filename, framework="np", backend=backend, copy=copy)


def load(data):
    """Loads a safetensors file held in bytes into numpy arrays."""
    return _load(data, framework="np")
