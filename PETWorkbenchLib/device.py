"""Choice of the compute device (CUDA, Apple MPS or CPU), with the reason for the choice."""

import os
from dataclasses import dataclass

from .errors import InputError

CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class DeviceChoice:
    name: str          # "cpu", "cuda", "cuda:1", "mps"
    reason: str

    def torch(self):
        import torch
        return torch.device(self.name)

    def __str__(self):
        return f"{self.name} ({self.reason})"


def choose_device(preference="auto", force_cpu=None):
    """Pick a torch device.

    ``preference`` is one of "auto", "cpu", "cuda", "cuda:N", "mps". ``force_cpu`` (or the environment variable
    ``PETWORKBENCH_FORCE_CPU=1``) overrides everything. Asking explicitly for an unavailable device is an error:
    silently falling back would hide a broken CUDA install from the user.
    """
    import torch

    preference = (preference or "auto").strip().lower()
    if preference.split(":")[0] not in CHOICES:
        raise InputError(f"Unknown device '{preference}': choose one of {', '.join(CHOICES)}")
    if force_cpu is None:
        force_cpu = os.environ.get("PETWORKBENCH_FORCE_CPU", "") not in ("", "0", "false", "False")
    if force_cpu:
        return DeviceChoice("cpu", "CPU forced by the user")
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if preference.startswith("cuda"):
        if not cuda_ok:
            raise InputError("CUDA was requested but torch reports no usable CUDA device "
                             f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda})")
        idx = int(preference.split(":")[1]) if ":" in preference else 0
        if idx >= torch.cuda.device_count():
            raise InputError(f"CUDA device {idx} requested but only {torch.cuda.device_count()} present")
        return DeviceChoice(f"cuda:{idx}", f"requested; {torch.cuda.get_device_name(idx)}")
    if preference == "mps":
        if not mps_ok:
            raise InputError("MPS was requested but this torch/macOS has no usable MPS device")
        return DeviceChoice("mps", "requested")
    if preference == "cpu":
        return DeviceChoice("cpu", "requested")
    if cuda_ok:
        return DeviceChoice("cuda:0", f"auto: CUDA available ({torch.cuda.get_device_name(0)})")
    if mps_ok:
        return DeviceChoice("mps", "auto: Apple MPS available")
    return DeviceChoice("cpu", "auto: no CUDA or MPS device available")


def torch_device(device="auto"):
    """The torch.device for a preference ("auto", "cpu", "cuda[:N]", "mps", None), a DeviceChoice or a
    torch.device: the one resolver every engine uses (:func:`choose_device` gives the reason for the choice)."""
    import torch
    if isinstance(device, torch.device):
        return device
    if isinstance(device, DeviceChoice):
        return device.torch()
    return choose_device(str(device or "auto")).torch()


def inference_precision(device, precision="float32"):
    """Check a network's inference arithmetic for ``device``: "float32", or "bfloat16" (``torch.autocast``: matrix
    products and convolutions in bfloat16 with float32 accumulation, everything else in float32). bfloat16 needs
    a CPU or CUDA device (autocast has no bfloat16 path elsewhere); on a CPU without native bfloat16 it is emulated
    and slower."""
    import torch
    name = str(precision or "float32").strip().lower().removeprefix("torch.")
    if name not in PRECISIONS:
        raise InputError(f"Unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    dev = torch_device(device)
    if name == "bfloat16" and dev.type not in ("cpu", "cuda"):
        raise InputError(f"bfloat16 inference needs a CPU or CUDA device, not {dev.type}")
    if name == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"this GPU ({torch.cuda.get_device_name(dev)}) does not support bfloat16; use float32")
    return name


def autocast(device, precision):
    """Context manager for :func:`inference_precision`'s result on ``device`` (a no-op for float32)."""
    import contextlib

    import torch
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch_device(device).type, dtype=torch.bfloat16)


def autocast_enabled(device_type):
    """Whether autocast is on for this device type (torch >= 2.4 takes the type; older: the CPU/CUDA forms)."""
    import torch
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def describe():
    """Versions and devices, for `petworkbench info` and bug reports."""
    import platform
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["threads"] = torch.get_num_threads()
        info["device"] = str(choose_device("auto"))
    except ImportError:
        info["torch"] = None
    for mod in ("monai", "SimpleITK", "numpy", "nibabel"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or getattr(m, "Version", lambda: "?")()
        except ImportError:
            info[mod] = None
    return info
