"""Property-based fuzzing (issue 13): the size/shape parsers, the method options and the dataset reader.

Every bad value must give a :class:`SegkdError` in-process, and through the CLI exactly one ``error: ...`` line on
stderr with exit code 1 or 2, never a traceback; every good value must parse to what it says. Most examples run
in-process; a handful go through the console entry point (``conftest.run_cli``). Derandomized, so CI sees the same
examples on every run. The regressions of what the fuzzing found are the ``@example`` rows and ``test_regression_*``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import re
import tempfile
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import one_error_line, run_cli
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_eval import _conv1x1

from segkd.bench.gates import parse_count
from segkd.bench.specs import expand_inputs, parse_batches, parse_percent
from segkd.data import build_dataset, inspect_dataset, validate_dataset
from segkd.engine.batch import Batch
from segkd.engine.config import TrainConfig, parse_scale
from segkd.engine.inference import make_predictor, parse_scales
from segkd.engine.task import OptimConfig
from segkd.errors import SegkdError
from segkd.methods import METHODS, make_options
from segkd.methods.base import parse_method_opts
from segkd.methods.task import assemble_task
from segkd.shapes import check_min_size, parse_hw, parse_shape

torch.set_num_threads(1)
# deterministic (derandomize, no example database), no deadline (a loaded CI machine), fixtures shared by examples
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


def refusal(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    """The one-line SegkdError message of ``fn(*args)``, or None when it accepts; any other exception fails."""
    try:
        fn(*args, **kwargs)
    except SegkdError as e:
        msg = str(e)
        assert "\n" not in msg and msg.strip(), repr(msg)
        return msg
    return None


def usage(message: str, command: str) -> str:
    """A bad option value's line: the message and the --help hint (exit 2, segkd.cli.option_values)."""
    return f"{message}; see 'segkd {command} --help'"


def cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``segkd ARGS`` must fail with exit 1 or 2 and print exactly one line, ``error: ...``, on stderr."""
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code in (1, 2), (code, err)
    line = one_error_line(err)
    assert err.strip() == line, err
    return line


# CLI values: any text a shell can pass (no NUL, no lone surrogates), with the near-misses that matter mixed in
ARG = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=16),
    st.sampled_from(["", " ", "x", "1x", "x1", "0x0", "-1x5", "1x3x64x64", "64x64", "²", "٣x٣", "1e999", "inf",
                     "nan", "-inf", "[/]", "[bold]b", "1_0x2", "3,0", "0.5,,2", "1,2,3"]),
)
NOT_OPTION = ARG.filter(lambda s: not s.startswith("-"))  # "-..." reads as an option to click (exit 2 is fine)


# ------------------------------------------------------------------------------------------- sizes and shapes
SEPS = st.sampled_from(["x", "X", "*", ","])
SPACE = st.sampled_from(["", " ", "  "])


@fuzz(300)
@given(h=st.integers(1, 8192), w=st.integers(1, 8192), sep=SEPS, pad=SPACE)
def test_parse_hw_good_values(h: int, w: int, sep: str, pad: str) -> None:
    assert parse_hw(f"{pad}{h}{sep}{w}{pad}", "--crop") == (h, w)
    assert parse_hw(str(h), "--crop") == (h, h)
    assert parse_hw((h, w)) == (h, w) and parse_hw([np.int64(h), w]) == (h, w)
    assert parse_hw(None) is None and parse_hw(f"{h}x{w}") == (h, w)


BAD_CHARS = "abcyz-./:;!?[]{}()#@&%$~`'\"=<>|\\^"


@st.composite
def hw_with_a_bad_char(draw: st.DrawFn) -> str:
    """A valid ``HxW`` with one character inserted that no size may contain."""
    text = f"{draw(st.integers(1, 99))}x{draw(st.integers(1, 99))}"
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(BAD_CHARS)) + text[at:]


@fuzz(400)
@given(text=st.one_of(ARG, hw_with_a_bad_char()))
@example(text="1x2x")
@example(text="0x5")
def test_parse_hw_bad_strings(text: str) -> None:
    msg = refusal(parse_hw, text, "--crop")
    if msg is None:  # accepted: then it was digits and separators, and means exactly what it says
        h, w = parse_hw(text, "--crop")
        assert h >= 1 and w >= 1 and parse_hw(f"{h}x{w}") == (h, w)
        assert not any(c in text for c in BAD_CHARS)
    else:
        assert msg.startswith("--crop ") and repr(text) in msg


@fuzz(200)
@given(value=st.one_of(
    st.lists(st.one_of(st.floats(), st.text(max_size=3), st.none(), st.integers(-5, 5)), max_size=3),
    st.integers(), st.floats(), st.none()))
@example(value=(1.5, 2))  # int() floored it to (1, 2)
@example(value=("a", 1))  # ValueError traceback
@example(value=(float("nan"), 1))  # ValueError traceback
@example(value=512)  # TypeError: 'int' object is not iterable
def test_parse_hw_python_values(value: Any) -> None:
    """The API form (tuples, run.json values): integers only, anything else one line; None (an option not given)
    passes through."""
    if value is None:
        assert parse_hw(value, "--crop") is None
        return
    ints = isinstance(value, list) and all(isinstance(v, int) for v in value)
    msg = refusal(parse_hw, value, "--crop")
    if ints and len(value) in (1, 2) and min(value) >= 1:
        assert msg is None and parse_hw(value) == (value[0], value[-1])
    else:
        assert msg is not None and msg.startswith("--crop ")


@fuzz(200)
@given(b=st.integers(1, 64), h=st.integers(1, 4096), w=st.integers(1, 4096), c=st.integers(0, 9), text=ARG)
def test_parse_shape(b: int, h: int, w: int, c: int, text: str) -> None:
    assert parse_shape(f"{b}x3x{h}x{w}") == (b, 3, h, w)
    assert parse_shape(f"{h}X{w}", allow_hw=True) == (1, 3, h, w)
    if c != 3:
        assert "C must be 3" in refusal(parse_shape, f"{b}x{c}x{h}x{w}")  # type: ignore[operator]
    msg = refusal(parse_shape, text, "--input", allow_hw=True)
    if msg is None:
        assert re.fullmatch(r"\d+(x\d+){1,3}", text.strip().lower().replace(" ", ""))
    else:
        assert msg.startswith("--input ")


@fuzz(200)
@given(a=st.floats(1e-3, 16), b=st.floats(1e-3, 16), text=ARG)
@example(a=1.0, b=1.0, text="0.5,1e6")  # a 64e6 x 64e6 image at the first iteration (the machine ran out of memory)
@example(a=1.0, b=1.0, text="1e300")  # OverflowError in the resize at the first iteration
def test_train_scale(a: float, b: float, text: str) -> None:
    lo, hi = min(a, b), max(a, b)
    assert parse_scale(f"{lo!r},{hi!r}") == (lo, hi) and parse_scale(repr(lo)) == (lo, lo)
    msg = refusal(parse_scale, text)
    if msg is None:
        lo, hi = parse_scale(text)
        assert 0 < lo <= hi <= 16  # the train transform can apply it
    else:
        assert msg.startswith("--scale ") and repr(text) in msg


@fuzz(200)
@given(vals=st.lists(st.floats(1e-3, 15.99), min_size=1, max_size=4), text=ARG)
def test_eval_scales(vals: list[float], text: str) -> None:
    assert parse_scales(",".join(map(repr, vals))) == tuple(vals) and parse_scales(None) == (1.0,)
    msg = refusal(parse_scales, text)
    if msg is None:
        assert all(0 < v < 16 for v in parse_scales(text))
    else:
        assert msg.startswith("--scales ")


@fuzz(150)
@given(h=st.integers(1, 20), w=st.integers(1, 20), ch=st.integers(1, 12), cw=st.integers(1, 12),
       sh=st.integers(1, 12), sw=st.integers(1, 12))
def test_slide_windows_predict_every_pixel(h: int, w: int, ch: int, cw: int, sh: int, sw: int) -> None:
    """Good --crop/--stride: a pointwise model predicts the same in slide mode as on the whole image."""
    model, x = _conv1x1(), torch.randn(1, 3, h, w)
    msg = refusal(make_predictor, model, mode="slide", crop=f"{ch}x{cw}", stride=f"{sh}x{sw}")
    if sh > ch or sw > cw:
        assert msg is not None and "is larger than --crop" in msg
        return
    slide = make_predictor(model, mode="slide", crop=f"{ch}x{cw}", stride=f"{sh}x{sw}")(x)
    torch.testing.assert_close(slide, make_predictor(model)(x), atol=1e-5, rtol=1e-5)


@fuzz(200)
@given(mode=st.one_of(st.sampled_from(["whole", "slide"]), ARG), crop=st.one_of(st.none(), ARG),
       stride=st.one_of(st.none(), ARG), scales=st.one_of(st.none(), ARG))
def test_make_predictor_options(mode: str, crop: str | None, stride: str | None, scales: str | None) -> None:
    """eval --mode/--crop/--stride/--scales: accepted or one line naming one of them."""
    msg = refusal(make_predictor, _conv1x1(), mode=mode, crop=crop, stride=stride, scales=scales or (1.0,))
    if msg is not None:
        assert msg.startswith(("--mode", "--crop", "--stride", "--scales", "tta")), msg


# ------------------------------------------------------------------------------------------------------ bench
@fuzz(300)
@given(batches=st.lists(st.integers(1, 512), min_size=1, max_size=5), text=ARG)
@example(batches=[1], text="²")  # str.isdigit() is true for '²', int() raised ValueError
def test_bench_batches(batches: list[int], text: str) -> None:
    assert parse_batches(",".join(map(str, batches))) == list(dict.fromkeys(batches))
    assert expand_inputs(["1x3x32x32"], parse_batches(",".join(map(str, batches)))) == [
        (b, 3, 32, 32) for b in dict.fromkeys(batches)]
    msg = refusal(parse_batches, text)
    if msg is None:
        assert parse_batches(text) is None or all(b >= 1 for b in parse_batches(text) or [])
    else:
        assert msg.startswith("--batch ")


@fuzz(300)
@given(value=st.floats(0, 1e6), suffix=st.sampled_from(["", "k", "K", "m", "M", "g", "b"]), pct=st.booleans(),
       text=ARG)
@example(value=1.0, suffix="", pct=False, text="1e999")  # parsed to inf: a gate that can never fail
@example(value=1.0, suffix="", pct=False, text="inf%")
def test_bench_gate_numbers(value: float, suffix: str, pct: bool, text: str) -> None:
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}[suffix.lower()]
    assert parse_count(f"{value!r}{suffix}") == pytest.approx(value * scale)
    assert parse_percent(f"{value!r}{'%' if pct else ''}") == pytest.approx(value / 100)
    for fn, option in ((parse_count, "--max-params"), (parse_percent, "--max-regression")):
        msg = refusal(fn, text)
        if msg is None:
            assert math.isfinite(fn(text)) and fn(text) >= 0
        else:
            assert msg.startswith(option)


@fuzz(12)
@given(inputs=st.lists(NOT_OPTION, min_size=1, max_size=2), batch=st.one_of(st.none(), NOT_OPTION),
       params=st.one_of(st.none(), NOT_OPTION), regression=st.one_of(st.none(), NOT_OPTION))
@example(inputs=["[/]"], batch=None, params=None, regression=None)  # rich read the message as markup: traceback
@example(inputs=["1x3x64x64"], batch="²", params=None, regression=None)
def test_cli_bench_values(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], inputs: list[str],
                          batch: str | None, params: str | None, regression: str | None) -> None:
    """Through the CLI: the first bad value in the order bench reads them is the one line; all good -> the
    --warmup -1 added to every command (so no example runs a benchmark)."""
    args = ["bench", "segformer-b0", "--warmup", "-1", "--no-flops"]
    for text in inputs:
        args += ["--input", text]
    for option, value in (("--batch", batch), ("--max-params", params), ("--max-regression", regression)):
        if value is not None:
            args += [option, value]
    checks = [lambda: params is None or parse_count(params), lambda: parse_percent(regression or "10%"),
              lambda: parse_batches(batch), *[lambda t=t: parse_shape(t, "--input", allow_hw=True) for t in inputs]]
    expected = next((m for m in (refusal(c) for c in checks) if m is not None),
                    "--warmup and --min-time must be >= 0 and --iters >= 1")
    assert cli_error(monkeypatch, capsys, *args) == f"error: {usage(expected, 'bench')}"


@fuzz(8)
@given(mode=st.one_of(st.just("slide"), NOT_OPTION), crop=st.one_of(st.none(), NOT_OPTION),
       stride=st.one_of(st.none(), NOT_OPTION), scales=st.one_of(st.none(), NOT_OPTION),
       resize=st.one_of(st.none(), NOT_OPTION))
@example(mode="whole", crop=None, stride=None, scales="0,1", resize=None)
def test_cli_eval_values(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], small_ckpt: Path,
                         mode: str, crop: str | None, stride: str | None, scales: str | None,
                         resize: str | None) -> None:
    """eval --mode/--crop/--stride/--scales/--resize through the CLI, in the order run_eval reads them; all good ->
    the missing --split named last (so no example runs an evaluation)."""
    args = ["eval", str(small_ckpt), "--data", "synth", "--split", "nosuch", "--mode", mode, "--device", "cpu",
            "--no-progress"]
    for option, value in (("--crop", crop), ("--stride", stride), ("--scales", scales), ("--resize", resize)):
        if value is not None:
            args += [option, value]

    def sizes() -> None:  # both parsed first, then both checked, as run_eval does
        given = {"--resize": parse_hw(resize, "--resize"), "--crop": parse_hw(crop, "--crop")}
        for option, hw in given.items():
            if hw is not None:
                check_min_size(hw, 32, option, "segformer-b0")

    values = [lambda: parse_hw(resize, "--resize"), lambda: parse_hw(crop, "--crop"),
              lambda: parse_hw(stride, "--stride"), lambda: parse_scales(scales)]  # EvalConfig.check: exit 2
    checks = [sizes, lambda: make_predictor(_conv1x1(), mode=mode, crop=crop, stride=stride, scales=scales or (1.0,))]
    expected = next((usage(m, "eval") for m in (refusal(c) for c in values) if m is not None), None)
    expected = expected or next((m for m in (refusal(c) for c in checks) if m is not None), None)
    line = cli_error(monkeypatch, capsys, *args)
    assert line == f"error: {expected}" if expected else "nosuch" in line, line


def test_regression_eval_scales_below_the_model_stride(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], small_ckpt: Path) -> None:
    """`eval --scales 0.1` shrank the 96x128 synth images to 10x13: a conv traceback at the first batch."""
    line = cli_error(monkeypatch, capsys, "eval", str(small_ckpt), "--data", "synth", "--scales", "0.1,1",
                     "--device", "cpu", "--no-progress")
    assert line == ("error: --scales 0.1: scales a 96x128 image to 10x13, below the 32x32 segformer-b0 needs (its "
                    "coarsest feature stride)")
    with pytest.raises(SegkdError, match=r"a 16x40 image, below the 32x32 the model needs.*--resize"):
        make_predictor(_conv1x1(), min_side=32)(torch.zeros(1, 3, 16, 40))
    assert make_predictor(_conv1x1(), min_side=32)(torch.zeros(1, 3, 32, 40)).shape == (1, 4, 32, 40)


@fuzz(6)
@given(crop=st.one_of(st.none(), NOT_OPTION), resize=st.one_of(st.none(), NOT_OPTION), scale=NOT_OPTION)
@example(crop=None, resize=None, scale="0.5,1e6")
def test_cli_train_values(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                          crop: str | None, resize: str | None, scale: str) -> None:
    """train --crop/--resize/--scale through the CLI; all good -> the bad --val-labels checked after them."""
    args = ["train", "--model", "segformer-b0", "--data", "synth", "--scale", scale, "--val-labels", "bogus",
            "--device", "cpu", "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")]
    for option, value in (("--crop", crop), ("--resize", resize)):
        if value is not None:
            args += [option, value]
    checks = [lambda: crop is None or parse_hw(crop, "--crop"), lambda: resize is None or parse_hw(resize, "--resize"),
              lambda: parse_scale(scale)]
    expected = next((m for m in (refusal(c) for c in checks) if m is not None),
                    "--val-labels must be resized or native, got 'bogus'")
    assert cli_error(monkeypatch, capsys, *args) == f"error: {usage(expected, 'train')}"
    assert not (tmp_path / "run").exists()
    assert refusal(TrainConfig(crop=crop, resize=resize, scale=scale, val_labels="bogus").check) == expected


# ------------------------------------------------------------------------------------------- method options
@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[Any, Any]]:
    """A (student, teacher-or-peer) pair for every registered method, 3 classes (models built once)."""
    from segkd.models import create_model

    torch.manual_seed(0)
    b0, b0b, b1, r18 = (create_model(n, num_classes=3) for n in ("segformer-b0", "segformer-b0", "segformer-b1",
                                                                  "deeplabv3-resnet18"))
    other = {"c2vkd": r18, "collab": r18, "transkd": b1}
    return {name: (b0, other.get(name, b0b)) for name in METHODS}


def _conforms(value: Any, typ: Any) -> bool:
    """Whether an option value has its field's declared type (finite floats, no bool for an int...)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        return value in args
    if type(None) in args:
        return value is None or _conforms(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        return isinstance(value, tuple) and all(_conforms(v, args[0]) for v in value)
    if typ is float:
        return isinstance(value, float) and math.isfinite(value)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _build(spec: Any, opts: Any, pair: tuple[Any, Any]) -> Any:
    """The method on its pair inside its task (teacher frozen / peer trained), as segkd distill builds it."""
    student, other = pair
    student.requires_grad_(True)
    other.requires_grad_(True)
    return assemble_task(spec, opts, student, other, OptimConfig.make("adamw"), OptimConfig.make("adamw"))


OPTION_VALUE = st.one_of(
    ARG, st.floats().map(repr), st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1", "0", "1e-300", "none", "true", "1,2", "1,2,3,4", " 2 "]),
    st.floats(), st.integers(), st.booleans(), st.none(), st.lists(st.floats(), max_size=5),
    st.lists(st.integers(-3, 6), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def method_overrides(draw: st.DrawFn) -> tuple[str, dict[Any, Any]]:
    name = draw(st.sampled_from(sorted(METHODS)))
    fields = [f.name for f in dataclasses.fields(METHODS.get(name).options)]
    key = st.one_of(st.sampled_from(fields), st.sampled_from(fields).map(lambda k: k.replace("_", "-")), ARG)
    return name, draw(st.dictionaries(key, OPTION_VALUE, max_size=3))


@fuzz(400)
@given(case=method_overrides())
@example(case=("c2vkd", {"pool_heads": "0"}))  # ZeroDivisionError when the method was built
@example(case=("c2vkd", {"ling_dim": "-1"}))  # RuntimeError: negative dimension
@example(case=("kd", {"temperature": float("nan")}))  # non-string values skipped every check: NaN loss
@example(case=("kd", {"weight": [1.0]}))  # TypeError in check()
@example(case=("transkd", {"embed": 2.5}))  # a float for an int field
def test_method_options_random(case: tuple[str, dict[Any, Any]], pairs: dict[str, tuple[Any, Any]]) -> None:
    """Random keys and values (text, numbers, nan/inf, negative, wrong Python types) for every method: one line, or
    options of the declared types that build the method on a real pair (or fail there with one line)."""
    name, overrides = case
    spec = METHODS.get(name)
    msg = refusal(make_options, spec, overrides)
    if msg is not None:
        assert name in msg or "option" in msg, msg
        return
    opts = make_options(spec, overrides)
    hints = typing.get_type_hints(spec.options)
    for f in dataclasses.fields(opts):
        assert _conforms(getattr(opts, f.name), hints[f.name]), (f.name, getattr(opts, f.name))
    if all(v <= 4096 for f in dataclasses.fields(opts) if hints[f.name] is int for v in [getattr(opts, f.name)]):
        refusal(_build, spec, opts, pairs[name])  # one line (a collab stage its models lack) or a built task
    # (larger ints are adapter widths such as csf_mid or ling_dim: not built, a width of 10^6 takes gigabytes)


INT_RANGES = {"gram_chunk": (1, 4096), "pool_seed": (0, 2**31 - 1), "pool_heads": (1, 64), "ling_dim": (1, 768),
              "rbsd_region": (1, 64), "embed": (0, 4), "csf_mid": (1, 96)}


def good_value(name: str, typ: Any) -> st.SearchStrategy[tuple[str, Any]]:
    """``(text, what it must parse to)`` for an in-range value of one option."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        return st.sampled_from(args).map(lambda v: (v, v))
    if type(None) in args:  # pool_weights: a file; none = the seeded random pool
        return st.sampled_from(["none", "None", "null", ""]).map(lambda v: (v, None))
    if origin is tuple and args[0] is int:  # hfd_stages
        return st.lists(st.integers(1, 4), min_size=1, max_size=4, unique=True).map(
            lambda v: (",".join(map(str, v)), tuple(v)))
    if origin is tuple:  # TransKD's per-stage weights
        return st.lists(st.floats(0, 2), min_size=4, max_size=4).map(lambda v: (";".join(map(repr, v)), tuple(v)))
    if typ is bool:
        return st.sampled_from([("true", True), ("Yes", True), ("1", True), ("off", False), ("0", False)])
    if typ is int:
        return st.integers(*INT_RANGES.get(name, (0, 8))).map(lambda v: (str(v), v))
    lo, hi = (0.25, 8.0) if "temperature" in name else (-2.0, 2.0) if name == "gl_init" else (0.0, 1.0)
    return st.floats(lo, hi).map(lambda v: (repr(v), v))


@st.composite
def good_overrides(draw: st.DrawFn) -> tuple[str, dict[str, tuple[str, Any]]]:
    name = draw(st.sampled_from(sorted(METHODS)))
    hints = typing.get_type_hints(METHODS.get(name).options)
    chosen = draw(st.lists(st.sampled_from(sorted(hints)), max_size=4, unique=True))
    return name, {k: draw(good_value(k, hints[k])) for k in chosen}


@fuzz(14)
@given(case=good_overrides())
def test_method_options_good_values_train(case: tuple[str, dict[str, tuple[str, Any]]],
                                          pairs: dict[str, tuple[Any, Any]]) -> None:
    """In-range values parse to what they say and give a finite loss with gradients on a real pair."""
    name, chosen = case
    spec = METHODS.get(name)
    opts = make_options(spec, {k: text for k, (text, _) in chosen.items()})
    for k, (_, want) in chosen.items():
        assert getattr(opts, k) == want, (k, getattr(opts, k), want)
    task = _build(spec, opts, pairs[name])
    task.train(True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2, 32, 32), generator=g)
    try:
        loss = task.losses(Batch(x, y))["loss"]
    except SegkdError as e:  # every weight drawn 0
        assert "no loss term" in str(e)
        return
    assert math.isfinite(float(loss.detach())), chosen
    loss.backward()
    assert any(p.grad is not None for p in pairs[name][0].parameters())
    pairs[name][0].zero_grad(set_to_none=True)
    pairs[name][1].zero_grad(set_to_none=True)


@fuzz(300)
@given(items=st.lists(ARG, max_size=4))
def test_parse_method_opts(items: list[str]) -> None:
    msg = refusal(parse_method_opts, items)
    if msg is not None:
        assert msg.startswith("--method-opt expects KEY=VALUE") and any("=" not in i for i in items)
        return
    expected = {}
    for item in items:
        k, v = item.split("=", 1)
        expected[k.strip()] = v.strip()
    assert parse_method_opts(items) == expected


@fuzz(5)
@given(case=method_overrides().filter(lambda c: len(c[1]) == 1 and all(isinstance(v, str) for v in c[1].values())))
def test_cli_method_opt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                        case: tuple[str, dict[str, str]]) -> None:
    """A refused --method-opt through `segkd distill`: its one line, and nothing written."""
    name, overrides = case
    ((key, value),) = overrides.items()
    assume("=" not in str(key) and not str(key).startswith("-"))  # "k=v" split at the first "="; "-..." an option
    msg = refusal(make_options, METHODS.get(name), {str(key).strip(): value.strip()})
    assume(msg is not None)
    spec = METHODS.get(name)
    weights = tmp_path / "t.safetensors"
    weights.write_bytes(b"x")  # checked to exist; the options fail before it is read
    partner = (["--peer", "segformer-b0"] if spec.peer else
               ["--teacher", "deeplabv3-resnet18" if name == "c2vkd" else "segformer-b0", "--teacher-weights",
                str(weights)])
    line = cli_error(monkeypatch, capsys, "distill", "--method", name, "--student", "segformer-b0", *partner,
                     "--method-opt", f"{key}={value}", "--device", "cpu", "--no-progress", "--out",
                     str(tmp_path / "run"))
    assert line == f"error: {msg}"
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------- dataset reader
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAIR_KINDS = ("good", "good_palette", "good_16bit", "garbage_image", "truncated_image", "garbage_label",
              "truncated_label", "wrong_size", "rgb_label", "rgba_label", "la_label", "float_label", "out_of_range",
              "wide_value", "missing_label", "orphan_label", "jpg_label", "same_stem")
CLASS_FILES = ("json", "txt", "none", "garbage_txt", "garbage_json", "short_palette", "empty_list")


def png(arr: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    """An array (its mode from its dtype and channels: L, LA, RGB, RGBA, I;16, F) or image, encoded as ``fmt``."""
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, fmt)
    return buf.getvalue()


def cut(data: bytes, frac: float) -> bytes:
    """``data`` (a PNG) cut somewhere before its pixel data ends (a write stopped midway)."""
    end = data.rindex(b"IEND") - 16  # before the last IDAT's CRC and the zlib checksum
    return data[: int(frac * end)]


@st.composite
def dataset_plan(draw: st.DrawFn) -> dict[str, Any]:
    pair = st.fixed_dictionaries({
        "kind": st.sampled_from(PAIR_KINDS), "h": st.integers(4, 12), "w": st.integers(4, 12),
        "seed": st.integers(0, 2**32 - 1), "frac": st.floats(0, 0.9), "blob": st.binary(max_size=48),
        "delta": st.integers(1, 3)})
    return {"k": draw(st.integers(2, 5)), "classes": draw(st.sampled_from(CLASS_FILES)),
            "pairs": draw(st.lists(pair, max_size=3)), "blob": draw(st.binary(max_size=32))}


def write_dataset(root: Path, plan: dict[str, Any]) -> tuple[set[Path], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Write a folder dataset from ``plan``; returns the files a bad pair makes bad, and the good pairs' content."""
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    k, bad, good = plan["k"], set(), {}
    for i, p in enumerate(plan["pairs"]):
        kind, rng, stem = p["kind"], np.random.default_rng(p["seed"]), f"p{i}"
        img = rng.integers(0, 256, (p["h"], p["w"], 3), dtype=np.uint8)
        lab = rng.choice(np.array([*range(k), 255], dtype=np.uint8), (p["h"], p["w"]))
        img_path, lab_path = images / f"{stem}.png", labels / f"{stem}.png"
        img_bytes, lab_bytes = png(img), png(lab)
        if kind == "good_palette":
            lab_bytes = png(Image.fromarray(lab).convert("P"))  # L -> P keeps the values as indices (grey palette)
        elif kind == "good_16bit":
            lab_bytes = png(lab.astype(np.uint16))
        elif kind == "garbage_image":
            img_bytes = PNG_SIGNATURE + p["blob"]
        elif kind == "truncated_image":
            img_bytes = cut(img_bytes, p["frac"])
        elif kind == "garbage_label":
            lab_bytes = PNG_SIGNATURE + p["blob"]
        elif kind == "truncated_label":
            lab_bytes = cut(lab_bytes, p["frac"])
        elif kind == "wrong_size":
            lab_bytes = png(np.zeros((p["h"] + p["delta"], p["w"]), np.uint8))
        elif kind in ("rgb_label", "rgba_label", "la_label"):
            chans = {"rgb_label": 3, "rgba_label": 4, "la_label": 2}[kind]
            lab_bytes = png(np.repeat(lab[..., None], chans, axis=2))
        elif kind == "float_label":
            lab_bytes = png(lab.astype(np.float32), fmt="TIFF")  # mode F, a TIFF named .png: PIL reads the content
        elif kind == "out_of_range":
            lab[0, 0] = k + p["seed"] % (255 - k)
            lab_bytes = png(lab)
        elif kind == "wide_value":
            wide = lab.astype(np.uint16)
            wide[-1, -1] = 256 + p["seed"] % 65000
            lab_bytes = png(wide)
        if kind != "orphan_label":
            img_path.write_bytes(img_bytes)
        if kind == "same_stem":
            (images / f"{stem}.jpg").write_bytes(png(img, fmt="JPEG"))
            bad |= {images / f"{stem}.jpg", img_path}
        if kind == "jpg_label":
            lab_path = labels / f"{stem}.jpg"
            lab_bytes = png(lab, fmt="JPEG")
        if kind == "orphan_label":
            lab_path = labels / f"q{i}.png"
        if kind != "missing_label":
            lab_path.write_bytes(lab_bytes)
        if kind.startswith("good"):
            good[stem] = (img, lab.astype(np.int64))
        else:
            bad |= {img_path, lab_path}
    names = [f"c{i}" for i in range(k)]
    files = {"json": ("classes.json", json.dumps({"classes": names}).encode()),
             "txt": ("classes.txt", "\n".join(names).encode()),
             "garbage_txt": ("classes.txt", b"\xff" + plan["blob"]),
             "garbage_json": ("classes.json", b"{" + plan["blob"]),
             "short_palette": ("classes.json", json.dumps({"classes": names, "palette": [[0, 0, 0]]}).encode()),
             "empty_list": ("classes.json", json.dumps({"classes": []}).encode())}
    if plan["classes"] in files:
        fname, data = files[plan["classes"]]
        (root / fname).write_bytes(data)
    return bad, good


_ds_ids = itertools.count()


@fuzz(250)
@given(plan=dataset_plan())
def test_folder_dataset_files(tmp_path: Path, plan: dict[str, Any]) -> None:
    """A folder dataset of random, truncated, mis-sized, wrong-mode, out-of-range, mismatched or missing files:
    building and validating it fails with one line naming a bad file, or (all good) gives back exactly what was
    written; `data inspect` lists a problem exactly when a pair is bad."""
    root = tmp_path / f"ds{next(_ds_ids)}"
    bad, good = write_dataset(root, plan)
    classes_bad = plan["classes"] not in ("json", "txt", "none")
    num_classes = plan["k"] if plan["classes"] == "none" else None
    expect_fail = bool(bad) or classes_bad or not plan["pairs"]

    def load_all() -> list[tuple[np.ndarray, np.ndarray]]:
        ds = build_dataset(root, "train", num_classes=num_classes)
        validate_dataset(ds, full=True)
        assert all(len(ds[i]) == 2 for i in range(len(ds)))
        return [ds.load(i) for i in range(len(ds))]

    msg = refusal(load_all)
    if expect_fail:
        assert msg is not None, plan
        named = bad | ({root / "classes.json", root / "classes.txt", root} if classes_bad else set()) | (
            {root} if not plan["pairs"] else set())
        assert any(str(p) in msg for p in named), (msg, plan)
    else:
        assert msg is None, (msg, plan)
        items = load_all()
        for (img, lab), stem in zip(items, sorted(good), strict=True):
            assert np.array_equal(img, good[stem][0]) and np.array_equal(lab, good[stem][1])
    report = None
    problem = refusal(lambda: inspect_dataset(root, num_classes=num_classes))
    if problem is None:
        report = inspect_dataset(root, num_classes=num_classes)
        assert bool(report["problems"]) == (bool(bad) or not plan["pairs"]), (report["problems"], plan)
        assert all("\n" not in p for p in report["problems"])
    else:
        assert classes_bad, problem


def test_regression_classes_txt_not_utf8(tmp_path: Path) -> None:
    """A classes.txt of random bytes was a UnicodeDecodeError traceback (build_dataset and `data inspect`)."""
    write_dataset(tmp_path, {"k": 2, "classes": "garbage_txt", "blob": b"\xfe\x00", "pairs": [
        {"kind": "good", "h": 4, "w": 4, "seed": 0, "frac": 0.5, "blob": b"", "delta": 1}]})
    with pytest.raises(SegkdError, match=r"classes.txt: not a UTF-8 text class file \(invalid start byte at byte 0\)"):
        build_dataset(tmp_path, "train")


@fuzz(5)
@given(plan=dataset_plan())
def test_cli_data_inspect(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                          plan: dict[str, Any]) -> None:
    """`segkd data inspect` on the same datasets: exit 0 when clean, else exit 1 and one error line."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        root = Path(tmp) / "ds"
        bad, _ = write_dataset(root, plan)
        extra = ["--num-classes", str(plan["k"])] if plan["classes"] == "none" else []
        clean = not bad and plan["pairs"] and plan["classes"] in ("json", "txt", "none")
        if clean:
            code, _, err = run_cli(monkeypatch, capsys, "data", "inspect", str(root), *extra)
            assert code == 0 and "error" not in err, err
        else:
            cli_error(monkeypatch, capsys, "data", "inspect", str(root), *extra)
