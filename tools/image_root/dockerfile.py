"""What `docker build` would do with our Dockerfile, as data: its instructions, and the build context's files as
`.dockerignore` filters them (Docker's rules: patterns anchored at the context root, `**` for any folders, `!` to
re-include, the last matching line wins, a matched folder takes its contents with it)."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from libs.errors import UserError

# instructions that change nothing a check inside the root could see
INERT = {"VOLUME", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
REPLAYED = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str
    line: int  # 1-based line of the Dockerfile where the instruction starts

    def __str__(self) -> str:
        return f"{self.keyword} {self.argument}"


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The instructions with their continuation lines joined; anything this replay cannot reproduce is refused."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped, as Docker does
        start = start if pending else number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, argument = (pending + line).strip().partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword not in REPLAYED | INERT:
            raise UserError(f"{path}:{start}: {keyword} is not replayed by the image check; "
                            f"use {', '.join(sorted(REPLAYED))} (or teach tools/image_root/dockerfile.py)")
        if re.search(r"\$\{\w+:", argument) and keyword != "RUN":
            raise UserError(f"{path}:{start}: {keyword} uses a ${{VAR:...}} form the image check does not replay: "
                            "use $VAR or ${VAR}")
        instructions.append(Instruction(keyword, argument.strip(), start))
    if pending:
        raise UserError(f"{path}:{start}: the last instruction ends with a line continuation")
    if not instructions or instructions[0].keyword != "FROM":
        raise UserError(f"{path}: the first instruction must be FROM")
    return instructions


def env_pairs(argument: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (and the legacy `ENV A 1`) as a dict."""
    words = shlex.split(argument)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def expand(text: str, variables: dict[str, str]) -> str:
    """Docker's `$VAR` / `${VAR}` substitution (build args and earlier ENV; unset = empty) in ENV, WORKDIR, COPY."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def arg_default(argument: str) -> tuple[str, str]:
    """`ARG NAME=default` -> (NAME, default); a build without --build-arg gets the default."""
    name, _, default = argument.partition("=")
    words = shlex.split(default)
    return name.strip(), words[0] if words else ""


def copy_sources(argument: str) -> tuple[list[str], str]:
    """`COPY a b dest/` -> (["a", "b"], "dest/"); flags and wildcards are refused (not replayed)."""
    words = shlex.split(argument)
    if any(word.startswith("--") for word in words) or any(ch in w for w in words for ch in "*?["):
        raise UserError(f"COPY {argument}: flags and wildcards are not replayed by the image check")
    if len(words) < 2:
        raise UserError(f"COPY {argument}: needs a source and a destination")
    return words[:-1], words[-1]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A `.dockerignore` pattern as a regex over '/'-separated paths relative to the context."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


class DockerIgnore:
    """The context filter of a `.dockerignore` file (no file: nothing is ignored)."""

    def __init__(self, text: str = ""):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = re.sub(r"/+", "/", line[1:].strip() if keep else line).strip("/")
            if pattern.startswith("./"):
                pattern = pattern[2:]
            if pattern:
                self.rules.append((keep, _pattern_regex(pattern)))

    @classmethod
    def of(cls, context: Path) -> "DockerIgnore":
        path = context / ".dockerignore"
        return cls(path.read_text() if path.is_file() else "")

    def ignored(self, relative: str) -> bool:
        """Whether `relative` (a path inside the context) stays out of the build context."""
        parts = relative.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        verdict = False
        for keep, regex in self.rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = not keep
        return verdict

    @property
    def has_exceptions(self) -> bool:
        return any(keep for keep, _ in self.rules)


def context_files(context: Path, ignore: DockerIgnore | None = None) -> list[str]:
    """Every file and symlink `docker build` would send, as sorted '/'-separated paths relative to `context`."""
    ignore = ignore or DockerIgnore.of(context)
    found = []
    pending = [context]
    while pending:
        folder = pending.pop()
        for entry in sorted(folder.iterdir()):
            relative = entry.relative_to(context).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                if not (ignore.ignored(relative) and not ignore.has_exceptions):
                    pending.append(entry)
            elif not ignore.ignored(relative):
                found.append(relative)
    return sorted(found)
