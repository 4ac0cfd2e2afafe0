"""Command-line flags generated from a config block, so a script never keeps a hand-written mirror of it.

Every key becomes `--key` (or a flag name the script picks, e.g. `--nnet_path` for `paths.nnet`), typed
by its default: a bool becomes the pair `--key` / `--no_key`, a tuple or list takes one or more values,
ints and floats are parsed and checked against libs.config.KEY_RANGES (floats must also be finite), and
strings are taken as they are. The help text is the comment written after the key in the config file,
followed by the default of the config in use:

    parser = argparse.ArgumentParser()
    config = load_config(selected_config(argv))
    add_config_flags(parser, config, block_keys(config, "train"), key_comments(config_path(DEFAULT_CONFIG)))
    args = parser.parse_args(argv)
    apply_overrides(load_config(args.config), overrides(args))

A flag not given leaves the config's value alone (its parsed value is None), so a config file chosen
with --config keeps its own defaults. A bad value ends the parse with argparse's usage message and
exit status 2, naming the flag.
"""
from __future__ import annotations

import argparse
import shlex
import tokenize
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import ml_collections

from libs.config import DEFAULT_CONFIG, KEY_CHOICES, KEY_RANGES, Range, get_key

DEST_PREFIX = "config."
"""The parsed value of the flag for dotted key `train.lr` is `vars(args)["config.train.lr"]`."""
CONFIG_FLAG = "--config"


class FlagTarget(Protocol):
    """An argparse.ArgumentParser or one of its argument groups."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


def key_comments(path: str | Path) -> dict[str, str]:
    """The comment at the end of the line where each key is set in a config file, by dotted key, in file
    order: `config.seed = 1234  # c` gives {"seed": "c"}; the keyword arguments of a call assigned to a
    block, `config.train = d(lr=4e-5,  # c` (one key per line), give {"train.lr": "c"}. Comments on lines
    of their own (section headings) belong to no key."""
    with tokenize.open(path) as handle:
        tokens = [t for t in tokenize.generate_tokens(handle.readline) if t.type != tokenize.NL]
    line_comments = {}
    for token in tokens:
        if token.type == tokenize.COMMENT:
            line_comments.setdefault(token.start[0], token.string.lstrip("#").strip())
    comments: dict[str, str] = {}
    depth = 0
    for i, token in enumerate(tokens):
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        elif depth == 0 and _is_assignment(tokens, i):
            block, row = tokens[i + 2].string, token.start[0]
            if row in line_comments:
                comments[block] = line_comments[row]
            for key, key_row in _call_keywords(tokens, i + 4):
                if key_row in line_comments:
                    comments[f"{block}.{key}"] = line_comments[key_row]
    return comments


def block_keys(config: ml_collections.ConfigDict, block: str) -> dict[str, str]:
    """Flag name -> dotted key for every key of `config.<block>` (the flag is named after the key)."""
    return {key: f"{block}.{key}" for key in config[block]}


def add_config_flags(parser: FlagTarget, config: ml_collections.ConfigDict,
                     keys: Mapping[str, str], comments: Mapping[str, str],
                     choices: Mapping[str, Sequence[Any]] | None = None,
                     aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add one flag per entry of `keys` (flag name -> dotted key), typed by the key's value in `config`.

    `comments` (dotted key -> text, see key_comments) gives the help texts and the order (keys without a
    comment come last); `choices` (dotted key -> allowed values, besides libs.config.KEY_CHOICES) restricts a
    key, element-wise for tuples (whose help lists them); `aliases` (dotted key -> more option strings) adds spellings: for a
    bool, an alias starting with `--no_` switches it off, any other alias on."""
    choices, aliases = {**KEY_CHOICES, **(choices or {})}, aliases or {}
    order = {dotted: index for index, dotted in enumerate(comments)}
    for flag, dotted in sorted(keys.items(), key=lambda item: (order.get(item[1], len(order)), item[0])):
        value = get_key(config, dotted)
        sequence = isinstance(value, (tuple, list))
        allowed = choices.get(dotted)
        listed = f"one or more of: {' '.join(map(str, allowed))}; " if sequence and allowed else ""
        help_text = f"{comments.get(dotted, '')} ({listed}default: {format_default(value)})".strip()
        help_text = help_text.replace("%", "%%")
        extra = list(aliases.get(dotted, ()))
        dest = DEST_PREFIX + dotted
        if isinstance(value, bool):
            off = [f"--no_{flag}"] + [a for a in extra if a.startswith("--no_")]
            on = [f"--{flag}"] + [a for a in extra if not a.startswith("--no_")]
            parser.add_argument(*on, *off, dest=dest, action=_Switch, off_flags=off, help=help_text)
            continue
        kind = type(value[0]) if sequence and value else str if sequence else type(value)
        # a scalar's choices show in place of its metavar; a sequence's are listed in its help instead
        parser.add_argument(f"--{flag}", *extra, dest=dest, type=_value_parser(dotted, kind), default=None,
                            nargs="+" if sequence else None, choices=allowed, help=help_text,
                            metavar=None if allowed and not sequence else flag.upper())


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{dotted key: value} of the config flags given on the command line (lists become tuples, as in the
    config files), for libs.config.apply_overrides."""
    return {dest[len(DEST_PREFIX):]: tuple(value) if isinstance(value, list) else value
            for dest, value in vars(args).items() if dest.startswith(DEST_PREFIX) and value is not None}


def selected_config(argv: Sequence[str] | None, default: str = DEFAULT_CONFIG) -> str:
    """The --config value in `argv` (sys.argv when None), or `default`: the flags' defaults come from it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG, default=default)
    known, _ = pre.parse_known_args(argv)
    return known.config


def format_default(value: Any) -> str:
    """A value as it would be typed on the command line (what --help shows as the default)."""
    if isinstance(value, (tuple, list)):
        return shlex.join(str(item) for item in value)
    if isinstance(value, str):
        return shlex.quote(value)
    return str(value)


class _Switch(argparse.Action):
    """`--key` sets True, `--no_key` (and the other `off_flags`) False; the last one given wins."""

    def __init__(self, option_strings: Sequence[str], dest: str, off_flags: Sequence[str] = (),
                 default: Any = None, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)
        self.off_flags = frozenset(off_flags)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string not in self.off_flags)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _value_parser(dotted: str, kind: type) -> Any:
    """The argparse `type` of a key: parse as `kind`, then (numbers) check finiteness and KEY_RANGES."""
    allowed = KEY_RANGES.get(dotted, Range())

    def parse(text: str) -> Any:
        if kind not in (int, float):
            return kind(text)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def _is_assignment(tokens: list[tokenize.TokenInfo], i: int) -> bool:
    """tokens[i:] reads `config . <name> =`."""
    window = tokens[i:i + 4]
    return (len(window) == 4 and [t.string for t in window[:2]] == ["config", "."] and window[2].type == tokenize.NAME
            and window[3].type == tokenize.OP and window[3].string == "=")


def _call_keywords(tokens: list[tokenize.TokenInfo], i: int) -> list[tuple[str, int]]:
    """(keyword, line) of each keyword argument when tokens[i:] is a call `name(...)` or `a.b(...)`."""
    while i < len(tokens) and (tokens[i].type == tokenize.NAME or tokens[i].string == "."):
        i += 1
    if i >= len(tokens) or tokens[i].string != "(":
        return []
    found, depth = [], 0
    for j in range(i, len(tokens)):
        string = tokens[j].string
        if tokens[j].type == tokenize.OP and string in "([{":
            depth += 1
        elif tokens[j].type == tokenize.OP and string in ")]}":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1 and tokens[j].type == tokenize.NAME and tokens[j + 1].string == "=":
            found.append((string, tokens[j].start[0]))
    return found
