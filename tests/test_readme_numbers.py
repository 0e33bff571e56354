"""Every measured number on the results page (docs/results.md) and in the README names the committed JSON
value it reports, and is that value, with its sign, at the precision written.

A quoted number is bold and followed at once by an HTML comment naming its source (invisible when
rendered)::

    <!-- from markov/ranking.json datasets/digits, 16px/fid -->      sets the file (under eval/results/) and a base path
    FID **4.441**<!-- rows/[configuration=skips=markov]/mean -->       a path below that base
    **0.655**<!-- default_job/eval.json:fid/summary/fid/mean -->      or a file and a path of its own

A path is ``/``-separated keys; ``[key=value]`` picks the element of a list of dicts with that key; an
integer picks a list element. ``A / B`` or ``A - B`` binds a ratio or a difference of two paths. A number
written as a percentage (``44%``) is compared with 100 x the value. The written number must equal the
value rounded to the written decimals (``0.050`` for 0.052 fails; ``9.9e-05`` is read to its mantissa's
last digit), with the same sign. Outside bold, neither page holds decimal numbers or percentages in its prose:
a setting (``κ = 0.7``, a command) goes in a code span or a fenced code block, and any other measured number
must be bound.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS_PAGE = REPO / "docs" / "results.md"
RESULTS = REPO / "eval" / "results"
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
NUMBER = r"[-+−]?(?:\d+\.\d+|\d+|\.\d+)(?:e[-+]?\d+)?%?"
BOUND = re.compile(r"\*\*(" + NUMBER + r")\*\*<!--\s*(.*?)\s*-->", re.I)
FROM = re.compile(r"<!--\s*from\s+(\S+\.json)(?:\s+(.*?))?\s*-->")
CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
COMMENT = re.compile(r"<!--.*?-->")
LOOSE = re.compile(r"(?<![\w.])[-+−]?(?:\d+\.\d+|\.\d+|\d+(?:\.\d+)?%)(?![\w.])")  # a decimal, or a percentage


def prose(text: str) -> str:
    """``text`` with its fenced code blocks blanked (commands hold settings, not results), lines kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def resolve(path: str, source: tuple[str, str] | None):
    """The JSON value at ``path`` ("file.json:keys" or keys below the current ``from`` source)."""
    if ".json:" in path:
        file, keys = path.split(".json:", 1)
        file, keys = file + ".json", keys
    else:
        if source is None:
            raise KeyError(f"{path!r}: no file named and no <!-- from ... --> before it")
        file, base = source
        keys = f"{base}/{path}" if base else path
    value = json.loads((RESULTS / file).read_text())
    for key in (k for k in keys.split("/") if k):
        match = re.fullmatch(r"\[(.+?)=(.*)\]", key)
        if match:
            field, wanted = match.groups()
            found = [item for item in value if isinstance(item, dict) and str(item.get(field)) == wanted]
            if len(found) != 1:
                raise KeyError(f"{file}:{keys}: {len(found)} list elements with {field}={wanted}")
            value = found[0]
        elif isinstance(value, list):
            value = value[int(key)]
        else:
            if key not in value:
                raise KeyError(f"{file}:{keys}: no key {key!r} (keys: {sorted(value)[:12]})")
            value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KeyError(f"{file}:{keys} is {value!r}, not a number")
    return float(value)


def evaluate(expression: str, source) -> float:
    """A path, or ``A / B`` / ``A - B`` of two paths."""
    for operator in (" / ", " - "):
        if operator in expression:
            left, right = (evaluate(part, source) for part in expression.split(operator, 1))
            return left / right if operator == " / " else left - right
    return resolve(expression, source)


def agrees(written: str, value: float) -> bool:
    """``written`` is ``value`` rounded to the written precision, with its sign (a percentage: 100 x value)."""
    text = written.replace("−", "-").lstrip("+")
    if text.endswith("%"):
        text, value = text[:-1], 100 * value
    number = float(text)
    if "e" in text.lower():
        mantissa, exponent = text.lower().split("e")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        tolerance = 0.5 * 10 ** (int(exponent) - decimals)
    else:
        decimals = len(text.split(".")[1]) if "." in text else 0
        tolerance = 0.5 * 10**-decimals
    same_sign = number == 0 or value == 0 or (number > 0) == (value > 0)
    return same_sign and math.isfinite(value) and abs(number - value) <= tolerance * (1 + 1e-9) + 1e-15


def problems(text: str) -> list[str]:
    """Every number of the page ``text`` (outside fenced code) that is not bound to the value it writes."""
    found, source = [], None
    results = prose(text)
    # code spans may run over a line break: blank them (keeping the line count) before looking for loose numbers
    uncoded = CODE.sub(lambda m: "\n" * m.group(0).count("\n"), results).splitlines()
    for number, line in enumerate(results.splitlines(), 1):
        events = sorted(
            [(m.start(), "from", m) for m in FROM.finditer(line)]
            + [(m.start(), "bound", m) for m in BOUND.finditer(line)]
        )
        for _, kind, match in events:
            if kind == "from":
                source = (match.group(1), (match.group(2) or "").strip())
                continue
            written, expression = match.groups()
            try:
                value = evaluate(expression, source)
            except (KeyError, IndexError, ValueError, OSError) as err:
                found.append(f"line {number}: **{written}**: {err}")
                continue
            if not agrees(written, value):
                found.append(f"line {number}: **{written}** but {expression} is {value:.6g}")
        rest = LINK_TARGET.sub("", COMMENT.sub("", BOUND.sub("", uncoded[number - 1])))
        rest = re.sub(r"\*\*[^*]*\*\*", lambda m: "" if not LOOSE.search(m.group(0)) else m.group(0), rest)
        for loose in LOOSE.finditer(rest):
            found.append(
                f"line {number}: {loose.group(0)!r} is a measured-looking number bound to no JSON value "
                "(bold it and name its source, or put a setting in a code span)"
            )
    return found


def test_every_number_on_the_results_page_is_bound_to_its_json_value():
    text = RESULTS_PAGE.read_text()
    assert len(BOUND.findall(prose(text))) > 50, "the results page binds almost no number"
    assert not problems(text), "\n".join(problems(text))


def test_every_number_in_the_readme_is_bound_to_its_json_value():
    text = README.read_text()
    assert len(BOUND.findall(prose(text))) >= 2, "the README's measured times are not bound"
    assert not problems(text), "\n".join(problems(text))


def test_a_planted_wrong_number_fails():
    text = RESULTS_PAGE.read_text()
    assert not problems(text)
    raw_p = "[configuration=skips=none, prediction_type=sample]/p_holm"
    plants = {  # each a realistic mistake; every one must be caught
        "a flipped sign": ("Δ **-0.294**", "Δ **0.294**"),
        "a raw p for a Holm p": (f"**0.0027**<!-- {raw_p}", f"**0.0009**<!-- {raw_p}"),  # 0.0009: its raw p
        "a per-seed value for a mean": ("FID **0.620**<!-- fid/mean", "FID **0.685**<!-- fid/mean"),  # seed 3's
        "0.052 written as 0.050": (
            "**0.052**<!-- [configuration=skips=stochastic-depth]/p_holm",
            "**0.050**<!-- [configuration=skips=stochastic-depth]/p_holm",
        ),
        "an unbound measurement": ("**0.42**<!-- [configuration=cache=b8-N5]/delta -->", "0.42"),
        "a path to nothing": ("/p_holm -->", "/p_holmes -->"),
        "a mean bound to the wrong row": (
            "**6.651**<!-- [configuration=skips=full, prediction_type=epsilon]/mean",
            "**6.651**<!-- [configuration=skips=full, prediction_type=sample]/mean",
        ),
        "a skip's importance for another's": ("**0.129**<!-- delta_mean/6 -->", "**0.129**<!-- delta_mean/7 -->"),
    }
    for name, (right, wrong) in plants.items():
        assert right in text, f"the plant {name!r} needs {right!r} in docs/results.md"
        assert problems(text.replace(right, wrong, 1)), f"{name} went unnoticed"


def test_a_planted_wrong_number_in_the_readme_fails():
    text = README.read_text()
    assert not problems(text)
    plants = {
        "a wrong time": ("**19.25**<!--", "**19.5**<!--"),
        "an unbound time": ("**8.2**<!-- default_job/commands.json:make_test/minutes -->", "8.2"),
        "a result in the prose": ("## Five things", "Skip 8 costs 0.917 MSE.\n\n## Five things"),
    }
    for name, (right, wrong) in plants.items():
        assert right in text, f"the plant {name!r} needs {right!r} in the README"
        assert problems(text.replace(right, wrong, 1)), f"{name} went unnoticed"
    assert not problems(text + "\n```bash\npython bench/x.py --lr 0.5\n```\n")  # a setting in a command is no result


def test_the_matcher_reads_precision_signs_and_percentages():
    assert agrees("0.92", 0.9173) and not agrees("0.93", 0.9173)
    assert agrees("44%", 0.44) and agrees("35.4", 35.36) and not agrees("35.5", 35.36)
    assert agrees("2.2e-4", 2.2e-4) and agrees("9.9e-05", 9.93e-05) and not agrees("9.9e-05", 9.97e-05)
    assert not agrees("0.050", 0.052) and agrees("0.052", 0.0524)
    assert not agrees("0.37", -0.37) and agrees("-0.37", -0.3702) and agrees("−0.37", -0.3702)
    assert agrees("+1.8", 1.78) and agrees("0", 0.0)
