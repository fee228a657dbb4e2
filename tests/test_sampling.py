"""SamplingParams (cluster.engine.sampling): one definition of the options and their bounds."""

from __future__ import annotations

import pickle

import pytest

from cluster.errors import InvalidParameterError
from cluster.engine.sampling import MAX_SEED, SamplingParamError, SamplingParams, choice_seed, parse_logit_bias


@pytest.mark.parametrize("fields, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"penalty_last_n": 0}, "penalty_last_n"), ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"), ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"seed": -1}, "seed"), ({"seed": MAX_SEED + 1}, "seed"), ({"stop": ("",)}, "stop"),
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"), ({"stop_token_ids": (-2,)}, "stop_token_ids"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"logprobs": 1}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"grammar": " "}, "grammar"),
])
def test_bad_values_raise_an_error_naming_the_field(fields, field):
    for build in (SamplingParams.create, SamplingParams):  # valid once constructed, however it is built
        with pytest.raises(SamplingParamError) as info:
            build(**fields)
        assert info.value.field == field and info.value.param == field
        assert str(info.value).startswith(f"{field} must be ")
    with pytest.raises(SamplingParamError):
        SamplingParams().updated(**fields)


def test_defaults_are_valid_and_an_unknown_name_is_an_error_naming_it():
    SamplingParams()  # constructing checks every field
    with pytest.raises(InvalidParameterError, match="'top_kk'") as info:
        SamplingParams.create(top_kk=3)
    assert info.value.param == "top_kk"
    assert SamplingParams(max_tokens=3).updated(top_k=2) == SamplingParams(max_tokens=3, top_k=2)


def test_a_string_stop_is_one_stop_string_and_mappings_become_sorted_pairs():
    assert SamplingParams(stop="pumane").stop == ("pumane",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(logit_bias={9: -100, 3: 2.5}).logit_bias == ((3, 2.5), (9, -100))
    assert hash(SamplingParams(logit_bias={3: 1.0}, stop="x")) == hash(SamplingParams(logit_bias=((3, 1.0),), stop=("x",)))


def test_vocabulary_check_names_the_field_and_the_token():
    params = SamplingParams(logit_bias={3: 1.0, 500: -1.0})
    params.check_vocabulary(501)
    with pytest.raises(SamplingParamError, match="logit_bias") as info:
        params.check_vocabulary(500)
    assert info.value.value == 500
    with pytest.raises(SamplingParamError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(7,)).check_vocabulary(7)


def test_choices_have_one_choice_each_and_distinct_seeds_in_range():
    params = SamplingParams(n=4, seed=11)
    choices = list(params.choices())
    assert [c.n for c in choices] == [1] * 4 and choices[0].seed == 11
    assert len({c.seed for c in choices}) == 4 and all(0 <= c.seed <= MAX_SEED for c in choices)
    assert [c.seed for c in SamplingParams(n=4, seed=11).choices()] == [c.seed for c in choices]  # deterministic
    assert choice_seed(12, 1) != choice_seed(11, 1) and choice_seed(MAX_SEED, 3) <= MAX_SEED


def test_errors_cross_process_boundaries_with_their_field():
    error = pickle.loads(pickle.dumps(SamplingParamError("top_k", "an integer >= 0", -1)))
    assert (error.field, error.expected, error.value, error.param) == ("top_k", "an integer >= 0", -1, "top_k")
    plain = pickle.loads(pickle.dumps(InvalidParameterError("bad", param="tools")))
    assert plain.param == "tools" and str(plain) == "bad"


def test_cli_logit_bias_pairs():
    assert parse_logit_bias(["5=-100", "7=2.5"]) == {5: -100.0, 7: 2.5}
    for bad in (["5"], ["x=1"], ["5=y"]):
        with pytest.raises(SamplingParamError, match="TOKEN=BIAS"):
            parse_logit_bias(bad)
