"""Final answers out of free text: GSM8K's `#### n`, LaTeX `\\boxed{...}`, "the answer is n", else the
last number; numbers are compared by value (math-verify, when installed, also reads LaTeX forms)."""
from __future__ import annotations

import re
import threading
from fractions import Fraction

# A sign: '-', U+2212 (the minus sign), or an en dash (U+2013). Typeset text often puts an en dash for a
# minus ('–5 °C'), but its proper use is ranges ('pages 3–5'), so it counts as a sign only right before
# the digits and not right after a letter or digit: '–5' is -5, '3–5' reads as 3 and 5, not 3 and -5.
_SIGN = r"(?:[-\u2212]|(?<!\w)\u2013)"
# Commas only in thousands groups (1,234 and 12,345,678): '3,4' is two numbers, not 34.
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_NUMBER = _SIGN + r"?\$?" + _DIGITS + r"(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?"
_PATTERNS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer is[:\s]*\**\s*(" + _NUMBER + ")", re.IGNORECASE),
)
_ANY_NUMBER = re.compile(_NUMBER)
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_LATEX_SPACING_AND_SIGNS = re.compile(r"\\[!,;:]|\\?[$%]")  # '1\,000', '\$5', '18\%'
_UNIT_AFTER_NUMBER = re.compile(r"(\d)\s*\\(?:text|mbox|mathrm)\{[^{}\d]*\}")  # '18 \text{ cm}'
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<!\d)\d{1,3}(?:,\d{3})+(?![\d,])")


def boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a solution, normalized (see normalize_number); None if none."""
    inside = boxed(text)
    if inside is not None:
        plain = latex_plain(inside)
        return normalize_number(plain) or plain or None
    for pattern in _PATTERNS:
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def latex_plain(inside: str) -> str:
    """A boxed answer without its LaTeX dressing: '\\frac{3}{4}' -> '3/4', '18\\%' -> '18', '\\$5' -> '5',
    '18 \\text{ cm}' -> '18' (a unit), '\\text{18}' -> '18', '1\\,000' -> '1000', '1{,}000' -> '1,000'."""
    plain = _LATEX_SPACING_AND_SIGNS.sub("", _FRAC.sub(r"\1/\2", inside).replace("{,}", ","))
    return _TEXT.sub(r"\1", _UNIT_AFTER_NUMBER.sub(r"\1", plain)).strip()


def normalize_number(s: str) -> str | None:
    """'1,234' -> '1234', '$5.00' -> '5', '18%' -> '18', '−5' -> '-5', '1.5e3' -> '1500', '3/4' -> '3/4',
    '0.50' -> '1/2'; None if not a number ('3,4' is not: its comma separates no thousands)."""
    s = _THOUSANDS.sub(lambda m: m[0].replace(",", ""), s.strip().rstrip(".").removesuffix("%"))
    s = s.replace("$", "").replace("\u2212", "-").replace("\u2013", "-")  # Fraction takes a sign only in front
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return str(value.numerator) if value.denominator == 1 else str(value)


def same_number(predicted: str | None, reference: str) -> bool:
    """predicted (an extracted answer) equals the reference answer by value."""
    if predicted is None:
        return False
    a, b = normalize_number(predicted), normalize_number(reference)
    if a is not None and b is not None:
        return a == b
    return _math_verify(predicted, reference)


MAX_VERIFY_CHARS = 500  # longer extracted answers are not handed to sympy (see _math_verify)


def _math_verify(predicted: str, reference: str) -> bool:
    """math-verify's equivalence for non-numeric forms (fractions in LaTeX, expressions); False without it.
    Its time limits use signal.alarm, which only the main thread may set: in another thread (`forerun
    scale --concurrency`) it runs without them, on answers short enough not to need them."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    if len(predicted) > MAX_VERIFY_CHARS or len(reference) > MAX_VERIFY_CHARS:
        return False
    main = threading.current_thread() is threading.main_thread()
    parse_opts = {} if main else {"parsing_timeout": None}
    verify_opts = {} if main else {"timeout_seconds": None}
    return bool(verify(parse(f"${reference}$", **parse_opts), parse(f"${predicted}$", **parse_opts), **verify_opts))


def reference_answer(gsm8k_answer: str) -> str:
    """The number after '####' in a GSM8K answer field."""
    if "####" not in gsm8k_answer:
        raise ValueError(f"a GSM8K answer ends in '#### <number>'; got {gsm8k_answer[-60:]!r}")
    number = normalize_number(gsm8k_answer.rsplit("####", 1)[1].strip())
    if number is None:
        raise ValueError(f"the GSM8K answer {gsm8k_answer.rsplit('####', 1)[1].strip()!r} is not a number")
    return number
