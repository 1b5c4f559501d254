"""Hypothesis fuzzing of the spec parser (issue 16): any text is either a valid spec or a
gradsift SpecError, never another exception."""

from hypothesis import given, settings
from hypothesis import strategies as st

import gradsift as gs
from gradsift.aggregate import AGGREGATORS
from gradsift.errors import SpecError
from gradsift.specs import parse_spec

names = st.sampled_from(sorted(AGGREGATORS) + ["", "bogus", "clip", "m3"])
keys = st.sampled_from(["c", "fraction", "max_norm", "micro_batches", "threshold", "x", ""])
values = st.one_of(
    st.integers(-3, 5).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["True", "None", "(1,2)", "'a'", "", "1.5", "1e9", "[", "=", ","]),
)
part = st.builds(
    lambda n, kv: n + (":" + ",".join(f"{k}={v}" for k, v in kv) if kv else ""),
    names, st.lists(st.tuples(keys, values), max_size=3),
)
specs = st.one_of(st.lists(part, min_size=0, max_size=3).map("+".join), st.text(max_size=30))


@settings(max_examples=300, deadline=None)
@given(specs)
def test_any_aggregator_spec_builds_or_raises_spec_error(spec):
    try:
        agg = gs.aggregate.aggregator_from_spec(spec)
    except SpecError as e:
        assert str(e)
    else:
        assert agg.output == "batch"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_spec_parses_or_raises_spec_error(text):
    try:
        name, options = parse_spec(text)
    except SpecError:
        return
    assert isinstance(name, str) and isinstance(options, dict)
