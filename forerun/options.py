"""NAME=VALUE options as the command lines take them (`--opt`, `--strategy-opt`, `--engine-arg`, the
bench's `method:name=value`): one parser, and one coercion of an option's text to the type it holds.

Values given in Python (SpecConfig(options={"nodes": 16})) are already typed and pass as they are."""
from __future__ import annotations

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def split_option(text: str, flag: str, form: str = "NAME=VALUE") -> tuple[str, str]:
    """"nodes=16" -> ("nodes", "16"); `flag` names where the text came from in the error."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"{flag} takes {form}, got {text!r}")
    return name.strip(), value.strip()


def parse_options(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """["datastore=DS", "depth=3"] -> {"datastore": "DS", "depth": "3"}; a repeated name keeps its last value."""
    return dict(split_option(pair, flag) for pair in pairs or ())


def coerce(name: str, value: object, kind: type | None) -> object:
    """Option `name`'s value as `kind` when it is text: bool (true/false, 1/0, yes/no in any case),
    int or float, each refusing other text with an error naming the option; str and other kinds keep
    the text. `kind` None: the type is not known, so it is read from the text (true or false, an
    integer, a number written with digits, else the text itself)."""
    if not isinstance(value, str):
        return value
    if kind is None:
        return _inferred(value)
    if kind is bool:
        return parse_bool(name, value)
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"option {name!r} takes {what}, got {value!r}") from None
    return value


def parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"option {name!r} takes true or false (or 1/0, yes/no), got {text!r}")


def _inferred(text: str) -> object:
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    if any(c.isdigit() for c in text):  # "inf" and "nan" stay text
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text
