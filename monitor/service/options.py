"""Settings declared once: a dataclass field's metadata makes it a `liqmon run` flag and a
`LIQMON_…` environment variable.

A settings dataclass marks each field with `option(…)` (a flag), `option_group()` (a nested
settings dataclass whose fields are flags) or `internal(…)` (no flag: tools and tests set it).
`add_options` generates the argparse flags, each defaulting to its environment variable, and
`from_args` builds the dataclass back from what argparse parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "LIQMON_"
_OPTION, _GROUP, _INTERNAL = "liqmon.option", "liqmon.group", "liqmon.internal"

# How an on/off variable reads: a switch (off by default) is on for these, a toggle (on by
# default) off for those.
_ON = ("1", "true", "yes")
_OFF = ("0", "false", "no")


class OptionError(ValueError):
    """An option's value cannot be used (a secret file that cannot be read, or given twice)."""


def _number(text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: "
                                         f"{text!r}") from None


# argparse types (the flag's `parse`): a value out of range is a usage error naming the flag,
# for the flag's text and its variable's alike

# Above this a count or a duration means nothing, and a whole number past 2^63 cannot even
# be logged (the start's log line lists every option).
MOST_WHOLE = 2**53


def at_least(least: int, most: int = MOST_WHOLE) -> Callable[[str], int]:
    """A whole number from ``least`` to ``most``."""
    def whole_number(text: str) -> int:
        value: int = _number(text, int)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be ≥ {least:,}, got {value:,}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be ≤ {most:,}, got {value:,}")
        return value
    return whole_number


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    value: float = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds ≥ 0 (0: no time at all)."""
    value: float = _number(text, float)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds ≥ 0, got {text}")
    return value


def share(text: str) -> float:
    """A share from 0 to 1."""
    value: float = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def ports(least: int) -> Callable[[str], int]:
    """A TCP port, ``least`` to 65535."""
    def port(text: str) -> int:
        value: int = _number(text, int)
        if not least <= value <= 65_535:
            raise argparse.ArgumentTypeError(f"must be a port from {least} to 65535, "
                                             f"got {value}")
        return value
    return port


port = ports(0)  # 0: none (a server that is not started)


def env_name(flag: str) -> str:
    """`--foo-bar` ↔ `LIQMON_FOO_BAR`: the rule deployments rely on."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


@dataclass(frozen=True, slots=True)
class Option:
    """How one settings field is given on the command line and in the environment."""

    flag: str
    # `{default}` is replaced by the flag's default (`{default:g}` formats it), `{secret_env}`
    # by the variable a secret's value may come from
    help: str
    metavar: str | None = None
    parse: Callable[[str], Any] = str  # argparse's type: for the flag's and the variable's text
    choices: tuple[str, ...] | None = None
    # value: takes a value; switch: on/off, off by default; toggle: --x/--no-x, on by default
    kind: Literal["value", "switch", "toggle"] = "value"
    to_field: Callable[[Any], Any] | None = None  # a given value → the field's (s → ms)
    from_field: Callable[[Any], Any] | None = None  # the field's default → the flag's
    # Set when the flag names a file holding this secret (e.g. "SASL password"): the secret
    # may come from the file or from its own variable, never from a command-line value.
    secret: str | None = None

    @property
    def env(self) -> str:
        return env_name(self.flag)

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def secret_flag(self) -> str:
        """The flag a secret would have if it were one (`--sasl-password`): refused."""
        return self.flag.removesuffix("-file")

    @property
    def secret_env(self) -> str:
        """The variable a secret's value may come from instead of the file."""
        return env_name(self.secret_flag)

    def help_text(self, default: Any) -> str:
        text = self.help.format(default=default, secret_env=self.secret_env)
        if self.kind == "switch":
            return f"{text} (env {self.env}=1)"
        if self.kind == "toggle":
            return f"{text} (env {self.env}=0 turns it off)"
        return f"{text} (env {self.env})"

    def flag_default(self, field_default: Any, environ: Mapping[str, str]) -> Any:
        """The variable's text when it is set (argparse parses it as it would the flag's:
        see `type_of`), else the field's default in the flag's terms. An on/off variable
        set to neither is kept as `Unreadable`, which `from_args` refuses; set empty, it is
        not set (a deployment template that leaves it blank)."""
        text = environ.get(self.env)
        if self.kind in ("switch", "toggle"):
            word = None if text is None else text.strip().lower()
            if not word:
                return field_default
            if word in _ON or word in _OFF:
                return word in _ON
            return Unreadable(self.env, text or "")
        if text is not None:
            return text
        return field_default if self.from_field is None else self.from_field(field_default)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """An on/off variable's text that is neither on nor off (`Option.flag_default`): refused
    by `from_args` rather than read as the default, so that LIQMON_RESET_STATE=on is not
    quietly off."""

    env: str
    text: str

    def problem(self) -> str:
        return (f"{self.env}={self.text!r} is neither on ({', '.join(_ON)}) nor off "
                f"({', '.join(_OFF)})")


def type_of(spec: Option, environ: Mapping[str, str]) -> Callable[[str], Any]:
    """The flag's argparse type: ``spec.parse``, checking ``choices`` too (argparse checks a
    flag's text against them, not a default's, and a variable's text is the default), and
    naming the variable when its text is what cannot be used."""

    def parse(text: str) -> Any:
        value = spec.parse(text)
        if spec.choices is not None and value not in spec.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(spec.choices)})")
        return value

    parse.__name__ = getattr(spec.parse, "__name__", "value")  # argparse's "invalid … value"
    return naming_variable(parse, spec.env, environ)


def naming_variable(parse: Callable[[str], Any], env: str,
                    environ: Mapping[str, str] = os.environ) -> Callable[[str], Any]:
    """An argparse type: ``parse``, saying "(from ``env``)" when the text it cannot use is
    that variable's (a flag's default read from it)."""
    from_variable = environ.get(env)

    def parse_text(text: str) -> Any:
        try:
            return parse(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            if text != from_variable:
                raise
            reason = (str(exc) if isinstance(exc, argparse.ArgumentTypeError)
                      else f"invalid value: {text!r}")
            raise argparse.ArgumentTypeError(f"{reason} (from {env})") from None

    parse_text.__name__ = getattr(parse, "__name__", "value")
    return parse_text


def non_empty(text: str) -> str:
    """Some text, not blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def servers(text: str) -> str:
    """Kafka bootstrap servers, HOST:PORT[,…]: at least one, none empty, each port a port."""
    for server in text.split(","):
        host, colon, port_text = server.strip().rpartition(":")
        if not server.strip() or (colon and not host):
            raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT…], got {text!r}")
        if colon and not (port_text.isdigit() and 0 < int(port_text) <= 65_535):
            raise argparse.ArgumentTypeError(f"{server.strip()!r}: the port must be a number "
                                             "from 1 to 65535")
    return text


def option(flag: str, help: str, **how: Any) -> dict[str, Option]:
    """Field metadata making the field a flag (see Option for `how`)."""
    return {_OPTION: Option(flag, help, **how)}


def option_group() -> dict[str, bool]:
    """Field metadata for a nested settings dataclass: its own fields are the flags."""
    return {_GROUP: True}


def internal(why: str) -> dict[str, str]:
    """Field metadata for a setting with no flag, saying why."""
    return {_INTERNAL: why}


def options(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """Every flag of a settings dataclass, nested groups included, in declaration order."""
    for field in dataclasses.fields(cls):
        if _OPTION in field.metadata:
            yield field, field.metadata[_OPTION]
        elif (group := option_group_class(field)) is not None:
            yield from options(group)


def option_group_class(field: dataclasses.Field[Any]) -> type[Any] | None:
    """The settings dataclass of an option group field, None for any other field."""
    if _GROUP not in field.metadata:
        return None
    factory = field.default_factory
    assert isinstance(factory, type), f"group {field.name} needs its class as default_factory"
    return factory


def is_internal(field: dataclasses.Field[Any]) -> bool:
    return _INTERNAL in field.metadata


def add_options(parser: argparse.ArgumentParser, cls: type[Any],
                environ: Mapping[str, str] = os.environ) -> None:
    """One flag per option of ``cls``, each defaulting to its environment variable."""
    for field, spec in options(cls):
        built_in = _field_default(field)
        default = spec.flag_default(built_in, environ)
        # the help names the built-in default, whatever the environment says
        help_text = spec.help_text(built_in if spec.from_field is None
                                   else spec.from_field(built_in))
        if spec.kind == "switch":
            parser.add_argument(spec.flag, action="store_true", default=default, help=help_text)
        elif spec.kind == "toggle":
            parser.add_argument(spec.flag, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(spec.flag, default=default, help=help_text,
                                type=type_of(spec, environ), choices=spec.choices,
                                metavar=spec.metavar)
        if spec.secret is not None:
            parser.add_argument(spec.secret_flag, nargs="?", action=_Refused,
                                refusal=f"{spec.secret_flag} is not accepted on the command "
                                        "line (every user of the machine can read it there): "
                                        f"set {spec.secret_env} or give {spec.flag}",
                                help=argparse.SUPPRESS)


def from_args(cls: type[Any], args: argparse.Namespace, environ: Mapping[str, str] = os.environ,
              **given: Any) -> Any:
    """An instance of ``cls`` from parsed flags; fields in ``given`` are taken as they are.
    Raises OptionError for a secret that cannot be read, or an on/off variable that is
    neither."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            values[field.name] = given[field.name]
        elif (group := option_group_class(field)) is not None:
            values[field.name] = from_args(group, args, environ)
        elif _OPTION in field.metadata:
            spec: Option = field.metadata[_OPTION]
            value = getattr(args, spec.dest)
            if isinstance(value, Unreadable):
                raise OptionError(value.problem())
            if spec.secret is not None:
                value = read_secret(spec, value, environ)
            if value is not None and spec.to_field is not None:
                value = spec.to_field(value)
            values[field.name] = value
    return cls(**values)


def option_values(settings: Any) -> dict[str, Any]:
    """Every option of a settings instance as it is in effect, by flag without its dashes,
    nested groups included (a log line's). A secret shows only that it is set."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if option_group_class(field) is not None:
            values.update(option_values(value))
        elif _OPTION in field.metadata:
            spec: Option = field.metadata[_OPTION]
            if spec.secret is not None:  # by the secret's name, not its file's flag
                values[spec.secret_flag.removeprefix("--")] = None if value is None else "(set)"
                continue
            if value is not None and spec.from_field is not None:
                value = spec.from_field(value)  # in the flag's units
            if isinstance(value, Path):
                value = str(value)
            values[spec.flag.removeprefix("--")] = value
    return values


def read_secret(spec: Option, path_text: str | None, environ: Mapping[str, str]) -> str | None:
    """A secret from its variable or from the file its flag names, never both."""
    secret = environ.get(spec.secret_env) or None
    if not path_text:
        return secret
    if secret is not None:
        raise OptionError(f"the {spec.secret} is given twice: set {spec.secret_env} or "
                          f"{spec.flag}, not both")
    path = Path(path_text)
    try:
        # the newline that `echo` or an editor leaves is not part of the secret
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise OptionError(f"cannot read {spec.flag} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:  # its message would quote bytes of the secret
        raise OptionError(f"{spec.flag} {path} is not UTF-8 text") from None
    if not secret:
        raise OptionError(f"{spec.flag} {path} is empty")
    return secret


class _Refused(argparse.Action):
    """A flag refused without repeating its value: a command line is readable by every user of
    the machine (ps, /proc) and stays in shell histories."""

    def __init__(self, option_strings: Sequence[str], dest: str, refusal: str,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.refusal = refusal

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(self.refusal)


def _field_default(field: dataclasses.Field[Any]) -> Any:
    return None if field.default is dataclasses.MISSING else field.default
