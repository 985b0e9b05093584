"""Fuzzing the config loader: any YAML mapping or --set value gives a Config or a ConfigError."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfkd.config import apply_overrides, config_from_dict, load_config
from selfkd.errors import ConfigError
from selfkd.methods import build_method

KEYS = [
    "run",
    "data",
    "model",
    "train",
    "method",
    "name",
    "epochs",
    "lr",
    "seed",
    "batch_size",
    "options",
    "milestones",
    "amp",
    "ablation",
    "alpha_g",
    "superior",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(string.printable, max_size=12),
    st.sampled_from(KEYS),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=5)


def load_all(data) -> None:
    cfg = config_from_dict(data)
    build_method(cfg.method)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_random_mappings_never_crash(data):
    try:
        load_all(data)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(string.printable, max_size=30), max_size=3))
def test_random_overrides_never_crash(overrides):
    try:
        load_all(apply_overrides({"method": {"name": "aikd"}}, overrides))
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=200))
def test_random_files_never_crash(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        build_method(load_config(path).method)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
