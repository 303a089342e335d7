"""pipelines.train.optim: the schedule against hand-worked values, EMA against its recurrence, freezing, AdamW."""

from __future__ import annotations

import pytest
import torch

from ofa_model import OFAModel, get_config
from pipelines.train.optim import Ema, build_optimizer, build_scheduler, freeze, move_schedule, polynomial_lr
from pipelines.train.train_config import OptimSection


def test_polynomial_lr_hand_worked():
    kw = dict(total=10, warmup=2, lr=1.0, end_lr=0.0, power=1.0)
    got = [polynomial_lr(s, **kw) for s in range(12)]
    # warmup 0.5, 1.0; then linear from 1.0 at step 2 to 0 at step 10
    want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert polynomial_lr(6, total=10, warmup=2, lr=1.0, end_lr=0.2, power=2.0) == pytest.approx(0.8 * 0.25 + 0.2)


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimSection(lr=0.1, warmup_ratio=0.25, end_lr=0.0)
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_updates=8)  # warmup 2
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.1 * 3 / 6, 0.1 * 2 / 6, 0.1 / 6])


def test_warmup_updates_replace_the_ratio_whatever_the_run_length():
    """A warm-up in updates is the same for any planned length (a time-budgeted run plans many epochs)."""
    p = torch.nn.Parameter(torch.zeros(2))
    for total in (8, 10_000):
        cfg = OptimSection(lr=0.1, warmup_ratio=0.25, warmup_updates=4, end_lr=0.1)
        opt = torch.optim.AdamW([p], lr=cfg.lr)
        sched = build_scheduler(opt, cfg, total_updates=total)
        seen = []
        for _ in range(6):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_a_schedule_moved_to_another_position_drives_the_optimizer_from_there():
    """A run resumed with another world size: the schedule rebuilt over the new plan's updates, loaded from the
    checkpoint and moved to the same share of the run; the rates from there are the new plan's."""
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimSection(lr=0.1, warmup_ratio=0.1, end_lr=0.0)
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    old = build_scheduler(opt, cfg, total_updates=10)  # 2 workers: 10 updates planned, 4 done
    for _ in range(4):
        opt.step()
        old.step()
    saved = {"optimizer": opt.state_dict(), "scheduler": old.state_dict()}
    opt2 = torch.optim.AdamW([p], lr=cfg.lr)
    opt2.load_state_dict(saved["optimizer"])
    new = build_scheduler(opt2, cfg, total_updates=20)  # 1 worker: twice the updates
    new.load_state_dict(saved["scheduler"])
    move_schedule(new, round(new.last_epoch * 20 / 10))
    assert new.last_epoch == 8 and new.get_last_lr() == pytest.approx([0.1 * (1 - 6 / 18)])
    seen = []
    for _ in range(12):
        seen.append(opt2.param_groups[0]["lr"])
        opt2.step()
        new.step()
    want = [polynomial_lr(s, total=20, warmup=2, lr=0.1, end_lr=0.0, power=1.0) for s in range(8, 20)]
    assert seen == pytest.approx(want, abs=1e-12)
    # the same share of the run, the same rate: where the old plan left it (warm-up 1 of 10: 0.1 * (1 - 3/9)
    # at 4) is where the new one goes on (warm-up 2 of 20: 0.1 * (1 - 6/18) at 8)
    assert old.get_last_lr()[0] == pytest.approx(0.1 * 6 / 9) == seen[0]


def test_ema_follows_its_recurrence_and_round_trips():
    m = torch.nn.Linear(3, 2)
    w0 = m.weight.detach().clone()
    ema = Ema(m, 0.9)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    restored = Ema(torch.nn.Linear(3, 2), 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9
    torch.testing.assert_close(restored.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="does not fit"):
        Ema(torch.nn.Linear(3, 2, bias=False), 0.9).load_state_dict(ema.state_dict())


def test_freezing_and_the_optimizer_see_the_same_parameters():
    model = OFAModel(get_config("ofa-micro"))
    frozen = freeze(model, OptimSection(freeze_embeddings=True, freeze_resnet=True))
    assert "encoder.embed_tokens.weight" in frozen
    assert any(n.startswith("encoder.embed_images.") for n in frozen)
    assert not any(n.startswith("encoder.layers.") for n in frozen)
    opt = build_optimizer(model, OptimSection())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) < len(list(model.parameters()))
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)


def test_bad_optim_settings_name_the_key():
    # built in Python, a config is validated as from YAML; pydantic names the class and the field
    with pytest.raises(ValueError, match=r"OptimSection\s+lr\s+Input should be a finite number"):
        OptimSection(lr=float("nan"))
    with pytest.raises(ValueError, match="optim.end_lr"):
        OptimSection(lr=1e-4, end_lr=1e-3)
    with pytest.raises(ValueError, match=r"OptimSection\s+grad_accum\s+Input should be greater than or equal to 1"):
        OptimSection(grad_accum=0)
