"""What runs train on: `--device auto|cpu|cuda|cuda:N`, resolved and checked before anything runs.

`auto` is CUDA where there is some (on a cluster: where a worker declares a GPU), else the CPU.
"""

from __future__ import annotations

import re

CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(ValueError):
    """A device that cannot be had; the message says what there is instead."""


def parse(text: str) -> str:
    """The device as written, checked for form only."""
    if not _PATTERN.fullmatch(text.strip()):
        raise DeviceError(f"--device must be {CHOICES}; got {text!r}")
    return text.strip()


def _index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def resolve_here(device: str) -> str:
    """The device on this machine: `auto` made concrete, CUDA checked to exist."""
    import torch

    device = parse(device)
    if device == "cpu":
        return device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__} is "
                          f"{build}); use --device cpu or auto")
    if _index(device) >= (n := torch.cuda.device_count()):
        raise DeviceError(f"--device {device}: this machine has {n} CUDA device(s), numbered from 0")
    return device


def resolve_on_cluster(device: str, address: str, *, gpu_workers: int, cuda_workers: int) -> str:
    """The device on the Dask cluster at `address`, given how many of its workers declare a GPU
    resource and how many have CUDA."""
    device = parse(device)
    if device == "cpu" or (device == "auto" and not gpu_workers):
        return "cpu"
    device = "cuda" if device == "auto" else device
    if not gpu_workers:
        raise DeviceError(f"--device {device}: no worker of the Dask cluster at {address} declares a GPU; start "
                          "GPU workers with `dask worker ... --nthreads 1 --resources GPU=1`, or use --device cpu")
    if not cuda_workers:
        raise DeviceError(f"--device {device}: no worker of the Dask cluster at {address} has a CUDA device")
    return device


__all__ = ["DeviceError", "CHOICES", "parse", "resolve_here", "resolve_on_cluster"]
