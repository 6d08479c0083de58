"""The arguments every entry point takes alike: the framework, the device, sizes."""

import functools

from ._native import Device as _Device
from ._native import Layout as _Layout
from ._native import SafetensorError

_FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt", "pytorch": "pt"}


def framework(name):
    """"np" or "pt" for the names safetensors accepts."""
    fw = _FRAMEWORKS.get(str(name).lower())
    if fw is None:
        raise SafetensorError(
            f"framework {name} is not supported by weightlift (use 'np' or 'pt')"
        )
    return fw


def device(framework, device):
    """The device as a string ("cpu", "cuda:N", any torch device), checked against the
    framework: numpy arrays live on the cpu."""
    if isinstance(device, int):
        device = f"cuda:{device}"
    device = str(device) if device is not None else "cpu"
    if framework == "np" and device != "cpu":
        raise SafetensorError(f"device {device} is invalid for numpy: use 'cpu'")
    return device


def size(value):
    """Bytes from an int or a size as people write it ("8GiB", "512MB"); None stays None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    from ._native import parse_size

    return parse_size(str(value))


_LAYOUTS = {"np": _Layout.NP, "pt": _Layout.PT}


def layout(framework):
    """How the native side describes tensors for `framework` ("np" or "pt", as
    ``framework()`` returns it)."""
    return _LAYOUTS[framework]


@functools.lru_cache(maxsize=64)
def native_device(device):
    """`device` ("cpu", "cuda:N") as the native side takes it, parsed once."""
    return _Device(str(device))
