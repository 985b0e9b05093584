"""data.mix parsed once into a typed spec; the methods' mixing rule; MethodContext's own facts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfkd.config import config_from_dict
from selfkd.errors import ConfigError
from selfkd.methods.base import MethodContext, build_method, check_number, mix_split
from selfkd.mixspec import MixSpec, parse_mix, split_rule


def test_data_mix_is_parsed_once_into_a_typed_spec(tiny_dict) -> None:
    tiny_dict["data"]["mix"] = {"name": "cutmix", "alpha": 0.5}
    cfg = config_from_dict(tiny_dict)
    spec = cfg.data.mix_spec
    assert spec == MixSpec(name="cutmix", alpha=0.5, size=None, prob=1.0, split=None)
    assert cfg.data.mix_spec is spec  # the same object: not parsed again
    assert cfg.data.mix == {"name": "cutmix", "alpha": 0.5}  # the section as written
    cfg.data.mix = {"name": "cutout", "size": 4}  # a changed section is parsed again
    assert cfg.data.mix_spec == MixSpec(name="cutout", size=4)
    cfg.data.mix = {"name": "none"}
    assert cfg.data.mix_spec is None
    assert (
        config_from_dict({**tiny_dict, "data": {**tiny_dict["data"], "mix": {}}}).data.mix_spec
        is None
    )


def test_mixing_rule_by_the_methods_mixing_mode() -> None:
    cutmix, cutout = parse_mix({"name": "cutmix"}), parse_mix({"name": "cutout"})
    assert cutmix is not None and cutout is not None
    assert mix_split(cutmix, build_method({"name": "pskd"})) is True
    assert mix_split(cutmix, build_method({"name": "ce"})) is False
    assert mix_split(cutout, build_method({"name": "dlb"})) is False
    assert mix_split(None, build_method({"name": "dlb"})) is False
    with pytest.raises(ConfigError) as exc:
        mix_split(cutmix, build_method({"name": "dlb"}))
    message = str(exc.value)
    assert message.startswith("method dlb cannot take data.mix=cutmix (it has no loss for mixed ")
    assert "cutmix works with aikd, ce, label_smoothing, pskd;" in message
    assert "\n" not in message
    # the leaf rule alone names no method list
    with pytest.raises(ConfigError, match=r"labels; cutout works with every method\)"):
        split_rule(cutmix, "dlb", "none")
    with pytest.raises(ValueError, match=r"Method\.mixing must be one of"):
        split_rule(cutmix, "x", "half")


def test_method_context_takes_batch_size_and_mix_from_a_config_mapping() -> None:
    def ctx(**kw):
        return MethodContext(2, 4, torch.zeros(4), 1, 1, torch.device("cpu"), nn.Identity,
                             lambda p: nn.Identity(), **kw)  # fmt: skip

    c = ctx(config={"data": {"batch_size": 8, "mix": {"name": "mixup"}}}, world_size=2)
    assert c.batch_size == 4 and c.mix == MixSpec(name="mixup")
    c = ctx(config={"data": {"batch_size": 8}}, batch_size=3)
    assert c.batch_size == 3 and c.mix is None
    assert ctx().batch_size is None and ctx().gather is None


@pytest.mark.parametrize(
    ("rule", "value", "message"),
    [
        ("unit", 1.5, "method.alpha must be in [0, 1], got 1.5"),
        ("positive", 0.0, "method.alpha must be > 0, got 0.0"),
        ("nonnegative", float("nan"), "method.alpha must be a finite number >= 0, got nan"),
    ],
)
def test_check_number_messages(rule, value, message) -> None:
    with pytest.raises(ConfigError) as exc:
        check_number("alpha", value, rule)
    assert str(exc.value) == message
    check_number("alpha", 0.5, rule)
    with pytest.raises(ConfigError, match=r"^method.tau of dlb must be > 0, got -1$"):
        check_number("tau", -1, "positive", "dlb")
