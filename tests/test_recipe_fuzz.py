"""Fuzzing the recipe's command-line overrides: whatever `key=value` a user types onto a real recipe, the answer is a
recipe or a RecipeError of one line that names the key -- never another exception, never a traceback.

A fixed budget (derandomized, max_examples below) keeps this at a few seconds; each example loads a real recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pretrain.recipe import Recipe, RecipeError, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mae_vit_tiny_fmnist.yaml"
# No shrinking: each example loads a recipe (~50 ms), and a failure is readable as found (the override is in it).
BUDGET = settings(max_examples=100, derandomize=True, deadline=None, phases=(Phase.explicit, Phase.generate),
                  suppress_health_check=[HealthCheck.too_slow])


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: sections and leaves."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        sub = getattr(cls(), f.name)
        if dataclasses.is_dataclass(sub):
            out += _keys(type(sub), f"{key}.")
    return out


KEYS = _keys(Recipe)

# The values people (and copy-paste) produce: wrong types, huge and tiny numbers, NaN/inf spelled every way, YAML's
# oddities (booleans by another name, octal and hex, anchors, tags, directives, flow mappings), OmegaConf's
# interpolations, unicode and control characters.
NASTY = [
    "", " ", "nan", "NaN", ".nan", "-.inf", "inf", "-inf", "1e400", "-1e400", "1e-400", "9" * 40, "-" + "9" * 400,
    "-1", "0", "-0", "2**31", "1_000", "0x10", "0o7", "1.5", "yes", "no", "on", "off", "true", "null", "~",
    "[", "]", "{", "}", "{}", "[]", "[[]]", "[{}]", "[1,[2]]", "[nan,1]", "[inf]", "[1e400]", "[null]", "[a,b]",
    "{a: 1}", "{x}", "{{}}", "{a: {b: c}}", "[1,2,3,4,5]", "[-1,-1]", "[0.5,0.2]", "'unterminated", "'", '"',
    "${", "${nope}", "${data.train}", "${oc.env:HOME}", "${oc.decode:'[1'}", "*alias", "&anchor x", "!!python/tuple",
    "!!binary AA==", "%YAML", "@at", "`tick", "|", ">", "#comment", "- item", "a: b", "=", "x=y", "\t", "\x00",
    "\u200b", "ünïcödé", "日本語", "🙂", "\\", "/", "..", "pipe:rm -rf /",
]
KEY_NOISE = ["nope", "data.nope", "data..train", ".data", "data.", "objective.mae.x", "data.train.x", "DATA.train",
             "run.seed.deeper", "objective..name", "alarm.", "ü.x", "+run.seed"]


def _scalar_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY),
        st.integers(min_value=-(10**450), max_value=10**450).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=8),
    )


def _values() -> st.SearchStrategy[str]:
    scalars = st.one_of(st.sampled_from(NASTY[:40]), st.integers(-(10**30), 10**30).map(str))
    flows = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["a", "b", "train", "seed"]), inner, max_size=2).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"),
    ), max_leaves=5)
    return st.one_of(_scalar_text(), flows)


def _first_unknown(key: str) -> str | None:
    """The dotted prefix of `key` where it leaves the schema (None when every part is a known key)."""
    cls: object = Recipe
    parts = key.lstrip("+").split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if fields is None or part not in fields:
            return ".".join(parts[: i + 1])
        cls = getattr(cls() if isinstance(cls, type) else cls, part)
    return None


def _check(key: str, value: str) -> None:
    override = f"{key}={value}"
    try:
        load_recipe(RECIPE, [override])
    except RecipeError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"{override!r}: not one line: {msg!r}"
        unknown = _first_unknown(key)
        if unknown is not None:
            assert "unknown recipe key" in msg and repr(unknown) in msg or repr(key) in msg, (override, msg)
        else:
            assert key.lstrip("+") in msg or key in _SWITCHES, (override, msg)
    except Exception as e:  # the failure, with the override that caused it (no shrinking to wait for)
        raise AssertionError(f"{override!r} raised {type(e).__name__}: {e}") from e


# A valid value of this key switches another section's checks on (objective.name=dino checks DINO's crops); their
# errors name the key that is out of line, which may be another.
_SWITCHES = {"objective.name"}


@BUDGET
@given(key=st.sampled_from(KEYS), value=_values())
@example(key="objective.mae.std", value="[[]]")  # a list in a list of floats: TypeError inside the checks
@example(key="alarm", value="{a: {b: c}}")  # an unknown key inside a section given whole: KeyError
@example(key="run.seed", value="${")  # OmegaConf's grammar error, a traceback of four lines
@example(key="run.out_dir", value="'unterminated")  # YAML's ScannerError
@example(key="model.img_size", value="9" * 200)  # the patch grid's square overflows a float: OverflowError
@example(key="data.train.x", value="1")  # below a leaf
def test_any_value_of_a_known_key_is_a_recipe_or_a_named_error(key, value):
    _check(key, value)


@settings(BUDGET, max_examples=30)
@given(key=st.one_of(st.sampled_from(KEY_NOISE), st.text(alphabet="abcdeüx._+ ", min_size=1, max_size=12)),
       value=_scalar_text())
def test_any_key_is_a_recipe_or_a_named_error(key, value):
    if "=" in key:  # the key ends at the first '='
        return
    _check(key, value)


@pytest.mark.parametrize("override", ["run.seed=${", "run.out_dir='x", "optim.betas=[0.9,[0.95]]", "alarm={a: 1}",
                                      "model.img_size=" + "9" * 30, "data.train.x=1"])
def test_what_the_fuzzer_found_says_what_to_fix(override):
    """What the fuzzer found, each said in one line that names the key and what was expected."""
    key = override.split("=", 1)[0]
    with pytest.raises(RecipeError) as caught:
        load_recipe(RECIPE, [override])
    msg = str(caught.value)
    assert "\n" not in msg and key.split(".")[0] in msg
    expected = {
        "run.seed=${": "run.seed='${': cannot be read as a value (",
        "run.out_dir='x": "run.out_dir=\"'x\": cannot be read as a value (",
        "optim.betas=[0.9,[0.95]]": "optim.betas=[0.9,[0.95]]: expected a list of 2 floats",
        "alarm={a: 1}": "unknown recipe key 'alarm.a' in section 'alarm'; valid keys: [",
        "model.img_size=" + "9" * 30: "model.img_size: a 30-digit integer is out of range",
        "data.train.x=1": "unknown recipe key 'data.train.x': data.train is a string, not a section",
    }[override]
    assert expected in msg, msg
