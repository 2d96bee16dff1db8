"""Sampling parameters, declared once: `SamplingParams`, whose every field carries its `Option`.

Each surface that takes a sampling value is derived from the fields below:

    generate / caption / draw flags     commands/sampling.py  (`--cfg` etc.: `Option.flag`)
    export's flags and sampling.yaml    the per-model options (groups "text" and "image")
    the viewer's form / JSON fields     serve/forms.py, and `/api/model` (`describe_options`)
    the sampler's `Request`             generate.py (a prompt and its `SamplingParams`)

A value is checked once, when a `SamplingParams` is made (`coerce`: type, range, choices). A check
that needs the model (an option's `check`, e.g. "an image fits the token budget") runs where the
sampler meets the model (`check_model`). The layers of defaults are merged by `merge_options`:
the sampler's (the field defaults) < a model's sampling.yaml < a command's own < what is given.

Adding an option is one field here (default, range, help, group) plus its use in the sampler;
the CLI flag, the sampling.yaml key, the HTTP field and the viewer's input follow from it.
"""

from __future__ import annotations

import math
import numbers
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import NoneType, UnionType
from typing import Any, Literal, get_args

from interleaf.errors import InterleafError

Mode = Literal["text", "image", "interleaved"]
MODES: tuple[str, ...] = get_args(Mode)

# the modes in which the options of a group act (the viewer shows a group only there)
GROUP_MODES = {"generation": MODES, "text": ("text", "interleaved"), "image": ("image", "interleaved")}


class OptionError(InterleafError):
    """A sampling value its option does not allow; `name` is the field, `requirement` what it must be."""

    def __init__(self, name: str, requirement: str, value: Any):
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(self.message(name))

    def message(self, shown_as: str) -> str:
        """The one-line error, naming the option as the user wrote it (a flag, a form field)."""
        shown = repr(self.value) if isinstance(self.value, str) else str(self.value)
        return f"{shown_as} must be {self.requirement}, got {shown[:40]}"


@dataclass(frozen=True)
class Option:
    """What a sampling field is: its help, its group, its valid values and its names elsewhere."""

    help: str
    group: str = "generation"  # "generation" (per request), "text" or "image" (a model may set these)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    also: tuple[float, str] | None = None  # a value outside [low, high] that is allowed, and what it means
    flag: str | None = None  # the command-line flag when not --name-with-dashes
    label: str | None = None  # the viewer's label when not the name
    modes: tuple[str, ...] | None = None  # the modes it acts in, when fewer than its group's
    follows: str | None = None  # given without this one, that option sets this one too (see merge_options)
    check: Callable[[SamplingParams, Any], str | None] | None = None  # (params, pipe) -> unmet requirement

    def allows(self, x: float) -> bool:
        """Whether a number of the right type is in range (NaN never is)."""
        if self.also is not None and x == self.also[0]:
            return True
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        return above and (self.high is None or x <= self.high)


def option(default: Any, help: str, **spec) -> Any:
    """A SamplingParams field: its default and its Option."""
    return field(default=default, metadata={"option": Option(help, **spec)})


def _image_fits(p: SamplingParams, pipe) -> str | None:
    need = pipe.vocab.tokens_per_image + 2  # <boi>, the codes, <eoi>
    if p.mode == "image" and p.max_new_tokens is not None and p.max_new_tokens < need:
        return f"at least {need} in image mode (one image of this model is {need} tokens)"
    return None


def _window_fits(p: SamplingParams, pipe) -> str | None:
    n = pipe.vocab.tokens_per_image
    return f"at most {n} (the codes of one image of this model)" if p.image_parallel > n else None


INT_MAX = 2**31 - 1  # what a per-row tensor of counts holds


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one generation; every value is checked on construction."""

    mode: Mode = option("text", "what to generate")
    max_new_tokens: int | None = option(
        None,
        "generated tokens at most (default: one image in image mode, else 256 text tokens plus room for the images)",
        low=1,
        label="max tokens",
        check=_image_fits,
    )
    max_images: int = option(1, "images at most in interleaved mode", low=0, modes=("interleaved",))
    seed: int = option(0, "random seed; sample i of a batch uses seed + i", low=-(2**63), high=2**64 - 1)
    preview_every: int = option(0, "image codes between partial previews of an image, 0 = none", low=0)
    temperature: float = option(0.7, "text temperature", group="text", low=1e-4, high=1e4, also=(0, "greedy"))
    top_k: int = option(0, "text top-k, 0 = off", group="text", low=0, high=INT_MAX)
    top_p: float = option(0.9, "text nucleus mass, 1 = off", group="text", low=0, high=1, low_open=True)
    min_p: float = option(
        0.0, "text min-p: keep tokens at least this times as likely as the best, 0 = off", group="text", low=0, high=1
    )
    repetition_penalty: float = option(1.0, "text repetition penalty, 1 = off", group="text", low=1e-4, high=1e4)
    # images must be sampled: greedy image tokens degenerate (0 is allowed, for tests and studies)
    image_temperature: float = option(
        1.0, "image-token temperature", group="image", low=1e-4, high=1e4, also=(0, "greedy")
    )
    image_top_k: int = option(0, "image-token top-k, 0 = off", group="image", low=0, high=INT_MAX)
    image_top_p: float = option(1.0, "image-token nucleus mass, 1 = off", group="image", low=0, high=1, low_open=True)
    image_min_p: float = option(0.0, "image-token min-p, 0 = off", group="image", low=0, high=1)
    image_parallel: int = option(
        1, "image codes a forward pass may take: a window of drafts verified at once (speculative Jacobi decoding, "
        "the same distribution), 1 = one code per pass", group="image", low=1, high=INT_MAX, check=_window_fits,
    )  # fmt: skip
    cfg_scale: float = option(
        3.0, "classifier-free guidance scale for images, 1 = off", group="image", low=0, high=1e3, flag="--cfg",
        label="guidance",
    )  # fmt: skip
    image_cfg_scale: float | None = option(
        None, "guidance toward the prompt's images, two-scale guidance (default: the cfg scale)", group="image",
        low=0, high=1e3, flag="--image-cfg", label="prompt-image guidance", follows="cfg_scale",
    )  # fmt: skip

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))

    def check_model(self, pipe) -> None:
        """Raise OptionError for a value the model cannot serve (options with a `check`)."""
        for name, opt in OPTIONS.items():
            unmet = opt.check(self, pipe) if opt.check is not None else None
            if unmet is not None:
                raise OptionError(name, unmet, getattr(self, name))

    def to_dict(self) -> dict:
        """Every option by name."""
        return {name: getattr(self, name) for name in OPTIONS}


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(SamplingParams)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SamplingParams)}
PER_MODEL = tuple(name for name, opt in OPTIONS.items() if opt.group != "generation")  # sampling.yaml's keys


def _kind(tp) -> tuple[type, bool, tuple[str, ...]]:
    """(number type or str, None allowed, choices) of an annotation."""
    args = get_args(tp)
    if typing.get_origin(tp) is Literal:
        return str, False, args
    if isinstance(tp, UnionType):
        (inner,) = (a for a in args if a is not NoneType)
        return _kind(inner)[0], True, ()
    return tp, False, ()


KINDS = {name: _kind(tp) for name, tp in typing.get_type_hints(SamplingParams).items()}


def requirement(name: str) -> str:
    """What a value of this option must be, in words: "a number in [0, 1000]"."""
    kind, _, choices = KINDS[name]
    if choices:
        return "one of " + ", ".join(choices)
    opt = OPTIONS[name]
    show = _show_int if kind is int else (lambda x: f"{x:g}")
    words = "an integer" if kind is int else "a number"
    if opt.low is not None and opt.high is not None:
        words += f" in {'(' if opt.low_open else '['}{show(opt.low)}, {show(opt.high)}]"
    elif opt.low is not None:
        words += f" {'>' if opt.low_open else '>='} {show(opt.low)}"
    if opt.also is not None:
        words += f" or {show(opt.also[0])} ({opt.also[1]})"
    return words


def _show_int(x: int) -> str:
    """An integer bound, powers of two written as such: 2^64 - 1."""
    for k in (31, 63, 64):
        for v, shown in ((2**k, f"2^{k}"), (2**k - 1, f"2^{k} - 1"), (-(2**k), f"-2^{k}")):
            if x == v:
                return shown
    return str(x)


def _number(value: Any, kind: type) -> float | int | None:
    """`value` as a number of `kind` (from Python, YAML, JSON or form text), or None."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            return kind(value.strip())
        if kind is int and isinstance(value, numbers.Integral):
            return int(value)
        if kind is int and isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        if kind is float and isinstance(value, numbers.Real):
            return float(value)
    except (ValueError, OverflowError):
        return None
    return None


def coerce(name: str, value: Any) -> Any:
    """A value of option `name` from any source, typed and checked; OptionError if it is not allowed."""
    kind, nullable, choices = KINDS[name]
    if value is None and nullable:
        return None
    if choices:
        if isinstance(value, str) and value.strip() in choices:
            return value.strip()
        raise OptionError(name, requirement(name), value)
    x = _number(value, kind)
    if x is None or (kind is float and math.isnan(x)) or not OPTIONS[name].allows(x):
        raise OptionError(name, requirement(name), value)
    return x


def options_from(data: Mapping[str, Any], names=tuple(OPTIONS)) -> dict:
    """The options of a mapping (a YAML file, a form), each coerced, in declaration order; a key not
    in `names` is refused."""
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InterleafError(f"unknown sampling option {str(unknown[0])[:40]!r} (known: {', '.join(names)})")
    return {k: coerce(k, data[k]) for k in OPTIONS if k in data}


def merge_options(base: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """`given` over `base`. An option that follows another is dropped from `base` when `given` sets
    the one it follows but not it: a given cfg_scale guides toward the prompt's images too."""
    dropped = {name for name, opt in OPTIONS.items() if opt.follows in given and name not in given}
    return {**{k: v for k, v in base.items() if k not in dropped}, **given}


def _label(name: str, group: str) -> str:
    """A field's name as the viewer labels it inside its group: image_top_k -> "top-k"."""
    return (name.removeprefix("image_") if group == "image" else name).replace("top_", "top-").replace("_", " ")


def describe_options() -> list[dict]:
    """Every option as the viewer builds its inputs: name, label, group, type, range, help, modes."""
    out = []
    for name, opt in OPTIONS.items():
        kind, nullable, choices = KINDS[name]
        out.append(
            {
                "name": name,
                "label": opt.label or _label(name, opt.group),
                "group": opt.group,
                "type": "choice" if choices else kind.__name__,
                "choices": list(choices),
                "min": opt.also[0] if opt.also is not None else opt.low,
                "max": opt.high,
                "nullable": nullable,
                "modes": list(opt.modes or GROUP_MODES[opt.group]),
                "help": opt.help,
            }
        )
    return out
