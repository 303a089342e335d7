"""GPU training throughput: ofa-base in bf16 autocast at 480 px, samples/s, tokens/s and model FLOPs utilisation.

Skipped (exit 0) where CUDA is absent, so `python -m bench` stays harmless on CPU machines.

One training step is what the trainer does per batch: forward under bf16 autocast (fp32 master weights),
`ofa_model.losses.label_smoothed_nll` in fp32, backward, gradient clipping, fused AdamW
(`pipelines.train.optim.build_optimizer` picks fused on CUDA). Batch "auto" takes the largest of 64, 48, 32, 24, 16, 8,
4, 2, 1 whose step runs without running out of memory. The FLOPs of one step (forward + backward; the optimizer's
elementwise work is left out, as MFU conventionally does) are counted by `torch.utils.flop_counter.FlopCounterMode`
(matmuls, convolutions, attention); MFU = counted FLOPs per step x steps/s / the device's dense bf16 peak, from
the table below by device name, or from OFA_PEAK_BF16_FLOPS (FLOP/s) when set.

    python -m bench gpu
    python -m bench.gpu --batch 32 --steps 20 --channels-last
    python -m bench.gpu --device cpu --arch ofa-micro --size 64 --batch 2 --steps 2   # checks the code path
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ofa_model.architecture import get_config
from ofa_model.losses import label_smoothed_nll
from ofa_model.model import OFAModel
from pipelines.train.optim import build_optimizer
from pipelines.train.train_config import OptimSection

PEAK_ENV = "OFA_PEAK_BF16_FLOPS"
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s; first match of the name wins.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)
AUTO_BATCHES = (64, 48, 32, 24, 16, 8, 4, 2, 1)
SRC_LEN, TGT_LEN = 32, 16


def peak_flops(name: str) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where the figure came from) for a device name."""
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env), f"${PEAK_ENV}"
    for key, value in PEAK_BF16:
        if key.lower() in name.lower():
            return value, f"table ({key})"
    return None, f"unknown device: set {PEAK_ENV}"


class Step:
    def __init__(self, arch: str, batch: int, size: int, device: torch.device, channels_last: bool):
        torch.manual_seed(0)
        self.model = OFAModel(get_config(arch)).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = build_optimizer(self.model, OptimSection(lr=1e-5))
        self.device, self.batch, self.size = device, batch, size
        g = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        self.src = torch.randint(4, 50000, (batch, SRC_LEN), generator=g).to(device)
        img = torch.randn(batch, 3, size, size, generator=g).to(device)
        self.img = img.contiguous(memory_format=torch.channels_last) if channels_last else img
        self.prev = torch.randint(4, vocab, (batch, TGT_LEN), generator=g).to(device)
        self.target = torch.randint(4, vocab, (batch, TGT_LEN), generator=g).to(device)
        self.masks = torch.ones(batch, dtype=torch.bool, device=device)

    def forward_backward(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(self.src, self.img, self.masks, self.prev)
        out = label_smoothed_nll(logits, self.target, pad_id=self.model.config.pad_id, epsilon=0.1)
        (out.loss / max(1, out.ntokens)).backward()

    def __call__(self) -> None:
        self.forward_backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def image_positions(self) -> int:
        return (self.size // 16) ** 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fit_batch(arch: str, size: int, device: torch.device, channels_last: bool, batches=AUTO_BATCHES) -> Step:
    """The largest batch of `batches` whose step (two, so the optimizer state is in memory) fits."""
    last = ""
    for b in batches:
        try:
            step = Step(arch, b, size, device, channels_last)
            step(), step()
            _sync(device)
            return step
        except torch.OutOfMemoryError as exc:
            last = str(exc).splitlines()[0]
        step = None  # the failed attempt's tensors go with the exception's frames, then the cache is emptied
        _release(device)
    raise RuntimeError(f"even batch {batches[-1]} does not fit: {last}")


def count_flops(step: Step) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.forward_backward()
    step.opt.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default; skipped when absent) or cpu (code-path check)")
    p.add_argument("--arch", default="ofa-base")
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--batch", default="auto", help="'auto' (largest that fits) or a number")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    p.add_argument("--channels-last", action="store_true", help="channels-last ResNet input and weights")
    args = p.parse_args(argv or [])
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu: CUDA is not available here; skipping the GPU benchmark")
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    t = time.perf_counter()
    if args.batch == "auto":
        step = fit_batch(args.arch, args.size, device, args.channels_last)
    else:
        step = Step(args.arch, int(args.batch), args.size, device, args.channels_last)
        step(), step()
    step()  # third warm-up step
    _sync(device)
    setup_s = time.perf_counter() - t
    n_params = step.model.num_parameters()
    print(f"gpu: {name}, torch {torch.__version__}; {args.arch} ({n_params / 1e6:.0f} M parameters), "
          f"{args.size}x{args.size}, batch {step.batch}{' (largest that fits)' if args.batch == 'auto' else ''}, "
          f"src {SRC_LEN}, tgt {TGT_LEN}, bf16 autocast, "
          f"{'fused' if step.opt.defaults.get('fused') else 'foreach'} AdamW"
          f"{', channels-last' if args.channels_last else ''}; set-up and warm-up {setup_s:.0f} s", flush=True)
    flops = count_flops(step)
    _sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t) / args.steps
    samples = step.batch / dt
    enc_tokens = step.image_positions() + SRC_LEN
    print(f"step {dt * 1000:.1f} ms: {samples:.1f} samples/s, {samples * (enc_tokens + TGT_LEN):,.0f} tokens/s "
          f"(encoder {enc_tokens} = {step.image_positions()} image patches + {SRC_LEN} source tokens, decoder "
          f"{TGT_LEN} target tokens per sample), {samples * TGT_LEN:,.0f} target tokens/s")
    achieved = flops / dt
    peak, source = peak_flops(name)
    mfu = f"MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16 ({source})" if peak else \
        f"MFU unknown ({source})"
    print(f"FLOPs per step (forward + backward, FlopCounterMode) {flops / 1e9:,.1f} G; achieved "
          f"{achieved / 1e12:.1f} TFLOP/s; {mfu}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
