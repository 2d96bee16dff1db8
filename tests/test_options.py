"""Sampling options are declared once (interleaf/sampling/params.py); every surface follows.

These tests loop over the declaration, not over a list of their own: an option added to
`SamplingParams` is covered here (and by test_serve.py's HTTP test) without editing a test.
"""

from __future__ import annotations

import pytest
from test_serve import option_values

from interleaf.cli import build_parser
from interleaf.commands.sampling import flag_of, given_options
from interleaf.errors import InterleafError
from interleaf.pipeline import read_sampling_defaults, write_sampling_defaults
from interleaf.sampling.params import (
    DEFAULTS,
    OPTIONS,
    PER_MODEL,
    OptionError,
    SamplingParams,
    coerce,
    describe_options,
    merge_options,
)

FIXED = {"caption": ("mode", "max_images"), "draw": ("mode", "max_images")}  # decided by the command


def parse(argv: list[str]):
    """(namespace, arguments the parser did not take)."""
    return build_parser().parse_known_args(argv)


@pytest.mark.parametrize("command", ["generate", "caption", "draw"])
def test_every_option_is_a_flag_of_the_generating_commands(command):
    args, extra = parse([command, "MODEL", "PROMPT"][: 3 if command != "generate" else 2])
    assert not extra
    assert given_options(args) == {"caption": {"mode": "text", "max_images": 0, "temperature": 0.0},
                                   "draw": {"mode": "image", "max_images": 1}}.get(command, {})  # fmt: skip
    for name in OPTIONS:
        good, _ = option_values(name)
        args, extra = parse(
            [command, "MODEL", "PROMPT"][: 3 if command != "generate" else 2] + [flag_of(name), str(good)]
        )
        if name in FIXED.get(command, ()):
            assert extra, (command, name)  # no such flag: the command decides it
            continue
        assert not extra and given_options(args)[name] == coerce(name, good), (command, name)


def test_export_has_a_flag_for_each_per_model_option_and_none_for_a_requests_own():
    assert PER_MODEL and set(PER_MODEL) < set(OPTIONS)
    for name in OPTIONS:
        good, _ = option_values(name)
        args, extra = parse(["export", "RUN", "OUT", flag_of(name), str(good)])
        if name in PER_MODEL:
            assert not extra and given_options(args) == {name: coerce(name, good)}, name
        else:
            assert extra, name  # a seed or a mode is not a model's default


def test_sampling_yaml_round_trips_every_per_model_option_and_refuses_bad_values(tmp_path):
    for name in PER_MODEL:
        good, bad = option_values(name)
        write_sampling_defaults(tmp_path, **{name: good})
        assert read_sampling_defaults(tmp_path) == {name: good}
        (tmp_path / "sampling.yaml").write_text(f"{name}: {bad}\n")
        with pytest.raises(InterleafError, match=f"sampling.yaml: {name} must be"):
            read_sampling_defaults(tmp_path)
        with pytest.raises(OptionError):
            write_sampling_defaults(tmp_path, **{name: bad})
    for name in set(OPTIONS) - set(PER_MODEL):
        with pytest.raises(InterleafError, match=f"unknown sampling option '{name}'"):
            write_sampling_defaults(tmp_path, **{name: DEFAULTS[name]})


def test_values_from_text_json_and_python_are_the_same_and_checked_alike():
    for name in OPTIONS:
        good, bad = option_values(name)
        assert coerce(name, str(good)) == coerce(name, good) == getattr(SamplingParams(**{name: good}), name)
        for value in (bad, str(bad), True, [good], "", None if DEFAULTS[name] is not None else "x"):
            with pytest.raises(OptionError, match=f"^{name} must be "):
                SamplingParams(**{name: value})
    assert SamplingParams(top_k=2.0).top_k == 2 and isinstance(SamplingParams(top_p=1).top_p, float)


def test_a_given_option_takes_the_one_that_follows_it_along():
    followers = {name: o.follows for name, o in OPTIONS.items() if o.follows}
    assert followers == {"image_cfg_scale": "cfg_scale"}
    model = {"cfg_scale": 1.5, "image_cfg_scale": 1.2}
    assert merge_options(model, {"cfg_scale": 4.0}) == {"cfg_scale": 4.0}
    assert merge_options(model, {"image_cfg_scale": 2.0}) == {"cfg_scale": 1.5, "image_cfg_scale": 2.0}
    assert merge_options(model, {"top_k": 3}) == {**model, "top_k": 3}


def test_the_viewer_description_matches_the_declaration():
    described = {o["name"]: o for o in describe_options()}
    assert list(described) == list(OPTIONS)
    for name, o in described.items():
        assert o["group"] in ("generation", "text", "image") and o["help"] == OPTIONS[name].help
        assert set(o["modes"]) <= {"text", "image", "interleaved"} and o["modes"]
        if o["group"] == "text":
            assert "image" not in o["modes"]
        if o["group"] == "image":
            assert "text" not in o["modes"]


def test_min_p_reaches_the_cli_sampling_yaml_and_the_viewer_from_its_declaration(tmp_path):
    """min_p / image_min_p were added as two fields in params.py and their use in the sampler
    (logits.filter_logits, generate.Row.sampling); no other file names them, yet:"""
    args, extra = parse(["generate", "MODEL", "--min-p", "0.1", "--image-min-p", "0.2"])
    assert not extra and given_options(args) == {"min_p": 0.1, "image_min_p": 0.2}
    args, extra = parse(["export", "RUN", "OUT", "--min-p", "0.05"])
    assert not extra and given_options(args) == {"min_p": 0.05}
    write_sampling_defaults(tmp_path, min_p=0.05, image_min_p=0.1)
    assert read_sampling_defaults(tmp_path) == {"min_p": 0.05, "image_min_p": 0.1}
    with pytest.raises(OptionError, match=r"^min_p must be a number in \[0, 1\], got 1.5"):
        SamplingParams(min_p=1.5)
    described = {o["name"]: o for o in describe_options()}
    assert described["min_p"]["group"] == "text" and described["image_min_p"]["group"] == "image"
    assert (described["min_p"]["min"], described["min_p"]["max"], described["image_min_p"]["label"]) == (0, 1, "min p")
