"""Fuzz every training argument through `ddpm_hf.training.args.validate` (what flags and JSON configs both go through).

A JSON config (`train.py config.json`) reaches the dataclasses without HfArgumentParser's type conversion, so
validation must catch wrong types too: `{"use_ema": "false"}` must not silently mean True.
"""

import dataclasses
import math
import typing

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddpm_hf.training import args as train_args

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from([0, -1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["linear", "tiny", "epsilon", "no", "fp16", "cosine", "false", "learned", "mit", "Apache 2.0"]),
    st.lists(st.integers(), max_size=2), st.just([]), st.just({}),
)
GROUPS = (train_args.DataArguments, train_args.ModelArguments, train_args.TrainingArguments)
FIELDS = [(group, field.name) for group in GROUPS for field in dataclasses.fields(group)]


def has_declared_type(value, hint) -> bool:
    """Whether `value` fits the dataclass annotation (`int | None`, `float`, `bool`, `str`, ...)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None:
        return type(None) in typing.get_args(hint)
    if isinstance(value, bool):
        return bool in options
    return any((o is int and isinstance(value, int)) or (o is float and isinstance(value, (int, float)))
               or (o is str and isinstance(value, str)) for o in options)


@FUZZ
@given(index=st.integers(0, len(FIELDS) - 1), value=ANYTHING)
@example(index=FIELDS.index((train_args.TrainingArguments, "use_ema")), value="false")
@example(index=FIELDS.index((train_args.DataArguments, "dataloader_num_workers")), value=None)
def test_every_argument(index, value):
    group, name = FIELDS[index]
    arguments = {g: g() for g in GROUPS}
    setattr(arguments[group], name, value)
    try:
        train_args.validate(*arguments.values())
    except (ValueError, TypeError) as error:
        assert f"--{name}" in str(error), f"{type(error).__name__}: {error}"
        return
    assert has_declared_type(value, typing.get_type_hints(group)[name]), f"--{name}={value!r} was accepted"
    assert not (isinstance(value, float) and not math.isfinite(value)), f"--{name}={value!r} was accepted"
    choices = next(f.metadata.get("choices") for f in dataclasses.fields(group) if f.name == name)
    assert choices is None or value is None or value in choices, f"--{name}={value!r} was accepted"


def test_defaults_are_valid():
    train_args.validate(*(g() for g in GROUPS))
