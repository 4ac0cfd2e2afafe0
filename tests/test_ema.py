"""EMA of the trained tensors (--ema_decay): the average follows its formula, validation/selection and the written
adapters use it (a step's checkpoint holds raw values and their average: the written ones are the average), and a
resumed run continues it exactly."""
from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch import nn

from libs.files import load_safetensors
from libs.train import train
from libs.train_output import CHECKPOINT_EMA, CHECKPOINT_WEIGHTS, list_checkpoints
from libs.train.ema import Ema
from tests.test_validation import KnownCurve, adapters, assert_bitwise, configured
from conftest import stop_at


def test_the_average_follows_its_formula_and_is_applied_only_inside_the_block():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    start = model.weight.detach().clone()
    ema = Ema(model, 0.9)
    values = [torch.randn(2, 3) for _ in range(3)]
    expected = start.clone()
    for value in values:
        model.weight.data.copy_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    assert set(ema.state()) == {"weight"} and torch.allclose(ema.state()["weight"], expected, atol=1e-6)
    with ema.applied():
        assert torch.allclose(model.weight, expected, atol=1e-6)
    assert torch.equal(model.weight, values[-1])
    off = Ema(model, 0.0)
    off.update()
    with off.applied():
        assert torch.equal(model.weight, values[-1])
    assert off.state() is None


def test_selection_and_the_written_adapters_use_the_average(tiny_config, photos, tmp_path):
    curve = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2}
    out = tmp_path / "out"
    train(configured(tiny_config, train_step=4, validation_steps=1, checkpointing_steps=1, checkpoints_total_limit=10,
                     keep_checkpoints=True, ema_decay=0.5, lr=1e-2), photos, out, score_fn=KnownCurve(curve))
    checkpoints = {int(p.name.split("-")[1]): p for p in list_checkpoints(out)}
    chosen = checkpoints[2]
    average, raw = load_safetensors(chosen / CHECKPOINT_EMA), load_safetensors(chosen / CHECKPOINT_WEIGHTS)
    assert_bitwise(adapters(out), average)
    assert any(not torch.equal(average[k], raw[k]) for k in raw)  # the average is not the raw step

    last = tmp_path / "last"  # no validation: the last step's average is written
    train(configured(deepcopy(tiny_config), train_step=3, validation_steps=0, checkpointing_steps=3, keep_checkpoints=True,
                     ema_decay=0.5, lr=1e-2), photos, last)
    assert_bitwise(adapters(last), load_safetensors(list_checkpoints(last)[-1] / CHECKPOINT_EMA))


def test_resume_is_exact_with_ema(tiny_config, photos, tmp_path):
    def config():
        return configured(deepcopy(tiny_config), train_step=5, checkpointing_steps=2, ema_decay=0.7, lr=1e-2)

    straight = tmp_path / "straight"
    train(config(), photos, straight)

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(config(), photos, resumed, on_step=stop_at(3))
    assert (list_checkpoints(resumed)[-1] / CHECKPOINT_EMA).is_file()
    train(config(), photos, resumed, resume="latest")
    a, b = adapters(straight), adapters(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
