"""Numeric precision and memory format: one setting shared by training and inference.

`Execution.resolve(precision, memory_format, device)` turns the configured names into what runs:

- precision `fp32`, `bf16` (autocast to bfloat16: CPUs with AVX-512 BF16/AMX, Ampere+ GPUs), `fp16`
  (autocast to float16, CUDA only). `auto` picks bf16 where the hardware runs it natively, fp32 elsewhere.
  Parameters stay fp32 in every mode: autocast only changes the dtype matmuls and convolutions run in.
- memory format `contiguous` or `channels_last` (the ResNet's convolutions and the images fed to it);
  `auto` is channels_last, which bench/train.py and bench/model.py measure faster on CPU and GPU alike.

The caller decides what `auto` means for its purpose: training passes `auto` through; inference picks its
default from the fidelity report (`python -m bench.inference fidelity`), since a default must never silently
change answers. `Execution.prepare_inference` also folds the ResNet's BatchNorms into its convolutions
(`ofa_model.resnet`): exact up to fp32 rounding, and it passes the same bar.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matmuls natively (not emulated, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


@dataclass(frozen=True)
class Execution:
    """A resolved precision and memory format for one device."""

    device: torch.device
    precision: str = "fp32"
    memory_format: str = "contiguous"

    @classmethod
    def resolve(cls, precision: str, memory_format: str, device: str | torch.device) -> Execution:
        device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        if precision == "auto":
            precision = "bf16" if native_bf16(device) else "fp32"
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device, got {device}; use bf16 or fp32")
        if memory_format == "auto":
            memory_format = "channels_last"
        return cls(device, precision, memory_format)

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Moves the model to the device in the memory format (4-D conv weights only; the rest is unchanged)."""
        return model.to(self.device, memory_format=self.torch_memory_format)

    def prepare_inference(self, model: torch.nn.Module, *, fold_batchnorm: bool = True) -> torch.nn.Module:
        """`prepare_model`, in eval mode, with the ResNet's BatchNorms folded into its convolutions for forwards
        without autograd (the model's weights and state dict are unchanged; training never sees the folding)."""
        model = self.prepare_model(model).eval()
        model.encoder.embed_images.fold_batchnorm(fold_batchnorm)  # an OFAModel's ResNet
        return model

    def images(self, images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None or images.ndim != 4:
            return images
        return images.to(self.device).contiguous(memory_format=self.torch_memory_format)

    def describe(self) -> str:
        return f"{self.device} {self.precision} {self.memory_format}"
