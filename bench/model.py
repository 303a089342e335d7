"""Model core on CPU: training step time, KV-cache speed-up, beam-search throughput (ofa-tiny).

Run alternately and side by side, so a noisy machine affects both sides of every ratio alike.
"""

from __future__ import annotations

import time

import torch

from ofa_model.architecture import get_config
from ofa_model.generation import GenerationConfig, SpecialIds, generate
from ofa_model.model import DecoderState, OFAModel

IDS = SpecialIds(bos=0, pad=1, eos=2)


def _timeit(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def train_step(model: OFAModel, repeat: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 50000, (8, 32), generator=g)
    img = torch.randn(8, 3, 256, 256, generator=g)
    prev = torch.randint(4, 50000, (8, 16), generator=g)
    target = torch.randint(4, 50000, (8, 16), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        logits = model(src, img, torch.ones(8, dtype=torch.bool), prev)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = _timeit(step, repeat)
    model.eval()
    return t


@torch.no_grad()
def decode_cached_vs_full(model: OFAModel, new_tokens: int = 32, batch: int = 4, size: int = 256,
                          repeat: int = 3) -> tuple[float, float]:
    """Greedy decoding with the KV cache vs recomputing the whole prefix (all logits) every step."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 50000, (batch, 32), generator=g)
    img = torch.randn(batch, 3, size, size, generator=g)
    enc = model.encode(src, img)

    def cached():
        tokens, state = torch.zeros(batch, 1, dtype=torch.long), DecoderState()
        for _ in range(new_tokens):
            nxt = model.decode(tokens, enc, state)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)

    def full():
        tokens = torch.zeros(batch, 1, dtype=torch.long)
        for _ in range(new_tokens):
            nxt = model.decode(tokens, enc)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)

    tc, tf = [], []
    for _ in range(repeat):  # interleaved
        tc.append(_timeit(cached, 1))
        tf.append(_timeit(full, 1))
    return sorted(tc)[repeat // 2], sorted(tf)[repeat // 2]


@torch.no_grad()
def beam_captions(model: OFAModel, batch: int = 16, repeat: int = 2) -> float:
    g = torch.Generator().manual_seed(2)
    src = torch.randint(4, 50000, (batch, 8), generator=g)
    img = torch.randn(batch, 3, 256, 256, generator=g)
    cfg = GenerationConfig(beam_size=5, max_len_b=16, no_repeat_ngram_size=3)
    return batch / _timeit(lambda: generate(model, src, img, cfg=cfg, ids=IDS), repeat)


def main() -> None:
    torch.manual_seed(0)
    # Denormal floats (seen in activations after a few optimizer steps) slow CPU matmuls 3-10x; process
    # owners (serving replicas, job entry points) should flush them the same way.
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu, model ofa-tiny")
    model = OFAModel(get_config("ofa-tiny"))
    t = train_step(model)
    print(f"train step (fwd+bwd+AdamW), batch 8, 256x256, src 32, tgt 16: {t:.2f} s/step")
    for batch, size in ((4, 256), (16, 480)):
        tc, tf = decode_cached_vs_full(model, batch=batch, size=size, repeat=1 if size > 256 else 3)
        print(f"greedy decode 32 new tokens, batch {batch}, {size}x{size}: KV cache {tc:.2f} s, "
              f"full recompute {tf:.2f} s, speed-up {tf / tc:.1f}x")
    ips = beam_captions(model)
    print(f"beam-5 captions (max 16 tokens, no-repeat 3), batch 16, 256x256: {ips:.2f} images/s")


if __name__ == "__main__":
    main()
