"""A clean Linux root standing in for the submission image's base, and commands run inside it.

The base (`FROM pytorch/pytorch:*-runtime`: Python and CUDA torch at /opt/conda, no X or OpenGL libraries) is
replaced by Debian's bare `--variant=apt` root from mmdebstrap, a Python environment at /opt/conda and the CPU
torch wheel. Every command runs through `unshare` in a private mount namespace (its mounts vanish with it, even
when the check is killed) and `chroot`; the run phase also gets a network namespace with no interfaces.

The root after the Dockerfile's dependency steps is cached (keyed by everything those steps read), so a second
check starts from it; each check then works on an overlay of the cached root, which stays untouched.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from libs.errors import UserError
from tools.image_root.dockerfile import Instruction, arg_default, copy_sources, env_pairs, expand

CACHE_DIR = Path("/var/cache/unidiffuser-image-check")
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")  # the base image's Python; nothing else (no X, no OpenGL)
BASE_PYTHON = "/opt/conda"  # where pytorch/pytorch keeps python and pip (on PATH there too)
BASE_PATH = f"{BASE_PYTHON}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
COMPLETE = ".image-check-complete"
HOST = "/run/image-check"  # where host folders are mounted inside the root
HOST_TOOLS = ("mmdebstrap", "unshare", "chroot", "mount")


def host_problems() -> list[str]:
    """Why this machine cannot run the check (empty when it can): root, and the tools the chroot needs."""
    problems = []
    if os.geteuid() != 0:
        problems.append("it needs root (mmdebstrap, chroot and mounts): run it as root, e.g. in CI")
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)}: apt-get install mmdebstrap util-linux coreutils")
    if "overlay" not in Path("/proc/filesystems").read_text():
        problems.append("the kernel has no overlay filesystem (modprobe overlay)")
    return problems


@dataclass(frozen=True)
class Bind:
    """A host path mounted at `target` inside the root for one command."""

    source: Path
    target: str
    read_only: bool = True


@dataclass
class Overlay:
    """A writable layer over read-only lower roots (the first one on top): what one check changes lands in
    `upper`, and the cached root stays untouched."""

    lowers: tuple[Path, ...]
    workdir: Path

    def __post_init__(self) -> None:
        for name in ("upper", "work", "merged"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)

    @property
    def upper(self) -> Path:
        return self.workdir / "upper"

    @property
    def merged(self) -> Path:
        return self.workdir / "merged"

    def mount_line(self) -> str:
        lowers = ":".join(str(lower) for lower in self.lowers)
        options = f"lowerdir={lowers},upperdir={self.upper},workdir={self.workdir / 'work'}"
        return f"mount -t overlay overlay -o {shlex.quote(options)} {shlex.quote(str(self.merged))}"


@dataclass
class Root:
    """A root filesystem folder (or an overlay on one) and the image's state while replaying: ENV and WORKDIR."""

    path: Path
    overlay: Overlay | None = None
    env: dict[str, str] = field(default_factory=lambda: {"PATH": BASE_PATH, "HOME": "/root", "LANG": "C.UTF-8"})
    workdir: str = "/"
    args: dict[str, str] = field(default_factory=dict)  # ARG values (their defaults: no --build-arg here)

    @property
    def top(self) -> Path:
        """The root as commands see it (the overlay's merged folder, mounted only inside each command)."""
        return self.overlay.merged if self.overlay else self.path

    def argv(self, command: str, *, binds: tuple[Bind, ...] = (), env: dict[str, str | None] | None = None,
             network: bool = False, cwd: str | None = None) -> list[str]:
        """The host command line running `command` (sh) inside the root: its own mount namespace (and a network
        namespace without interfaces unless `network`), /proc, /dev/shm, `binds`, the image's ENV (an `env`
        value of None removes that variable) and WORKDIR (or `cwd`)."""
        top = shlex.quote(str(self.top))
        lines = ["set -e"]
        if self.overlay:
            lines.append(self.overlay.mount_line())
        lines += [f"mount -t proc proc {top}/proc", f"mount -t tmpfs tmpfs {top}/dev/shm"]
        for bind in binds:
            source, target = shlex.quote(str(bind.source)), shlex.quote(f"{self.top}{bind.target}")
            lines.append(f"[ -e {target} ] || {{ mkdir -p \"$(dirname {target})\"; "
                         f"if [ -d {source} ]; then mkdir {target}; else touch {target}; fi; }}")
            lines.append(f"mount --bind {source} {target}")
            if bind.read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        merged = {**self.env, **(env or {})}
        variables = [f"{key}={value}" for key, value in merged.items() if value is not None]
        inner = f"cd {shlex.quote(cwd or self.workdir)} && {command}"
        lines.append(f"exec chroot {top} /usr/bin/env -i {' '.join(map(shlex.quote, variables))} /bin/sh -c "
                     f"{shlex.quote(inner)}")
        return ["unshare", "--mount", "--propagation", "private", *([] if network else ["--net"]),
                "/bin/sh", "-c", "\n".join(lines)]

    def run(self, command: str, *, binds: tuple[Bind, ...] = (), env: dict[str, str | None] | None = None,
            network: bool = False, capture: bool = False, timeout: float | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        """`command` inside the root (see `argv`); its output goes to ours unless `capture`."""
        return subprocess.run(self.argv(command, binds=binds, env=env, network=network, cwd=cwd),
                              stdin=subprocess.DEVNULL, capture_output=capture, text=capture, timeout=timeout)

    def copy_in(self, files: list[tuple[Path, str]]) -> None:
        """Put host files at absolute paths inside the root (owner root, modes kept), as `docker build`'s COPY."""
        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        process = subprocess.Popen(self.argv("tar -xpf - -C /", cwd="/"), stdin=subprocess.PIPE)
        with tarfile.open(fileobj=process.stdin, mode="w|") as tar:
            for source, target in files:
                tar.add(source, arcname=target.strip("/"), recursive=False, filter=as_root)
        process.stdin.close()
        if process.wait() != 0:
            raise RuntimeError(f"copying {len(files)} file(s) into {self.top} failed")

    def replay_state(self, instruction: Instruction) -> None:
        """ARG, ENV or WORKDIR: what the image's later instructions and commands see."""
        variables = {**self.args, **self.env}  # one instruction sees the values from before it, as in Docker
        if instruction.keyword == "ARG":
            name, default = arg_default(instruction.argument)
            self.args[name] = expand(default, variables)
        elif instruction.keyword == "ENV":
            self.env.update({key: expand(value, variables) for key, value in env_pairs(instruction.argument).items()})
        elif instruction.keyword == "WORKDIR":
            self.workdir = os.path.normpath(os.path.join(self.workdir, expand(instruction.argument, variables)))

    def replay(self, instruction: Instruction, context: Path, files: list[str],
               binds: tuple[Bind, ...] = (), env: dict[str, str | None] | None = None) -> None:
        """One Dockerfile instruction (not FROM): ENV and WORKDIR change the state, COPY and RUN the files;
        VOLUME, CMD and the like change nothing a check could see."""
        if instruction.keyword in ("ARG", "ENV", "WORKDIR"):
            self.replay_state(instruction)
            if instruction.keyword == "WORKDIR":
                self.run(f"mkdir -p {shlex.quote(self.workdir)}", cwd="/")
        elif instruction.keyword == "COPY":
            expanded = Instruction("COPY", expand(instruction.argument, {**self.args, **self.env}), instruction.line)
            self.copy_in(copy_plan(expanded, context, files, self.workdir))
        elif instruction.keyword == "RUN":  # the shell expands it; build args are in its environment, as in Docker
            done = self.run(instruction.argument, binds=binds, env={**self.args, **(env or {})}, network=True)
            if done.returncode != 0:
                raise UserError(f"Dockerfile line {instruction.line}: `RUN {instruction.argument}` failed in the "
                                f"clean root (exit {done.returncode}; its output is above)")


def copy_plan(instruction: Instruction, context: Path, files: list[str], workdir: str) -> list[tuple[Path, str]]:
    """(host file, path in the root) for a COPY: a folder source copies its contents, files go into a `/` dest."""
    sources, dest = copy_sources(instruction.argument)
    dest_abs = os.path.normpath(os.path.join(workdir, dest))
    plan = []
    for source in sources:
        source = os.path.normpath(source)
        if source == ".":
            chosen = [(name, name) for name in files]
        elif source in files:
            into_folder = dest.endswith("/") or len(sources) > 1 or dest in (".", "./")
            chosen = [(source, os.path.basename(source) if into_folder else "")]
        else:
            chosen = [(name, name[len(source) + 1:]) for name in files if name.startswith(source + "/")]
        if not chosen:
            raise UserError(f"Dockerfile line {instruction.line}: COPY source {source!r} is not in the build context "
                            f"(missing, or excluded by .dockerignore)")
        plan += [(context / name, os.path.join(dest_abs, tail) if tail else dest_abs) for name, tail in chosen]
    return plan


def dependency_steps(instructions: list[Instruction]) -> int:
    """How many instructions form the cached layer: up to the last RUN before the first COPY of the whole context
    (the project's code changes often; the install steps only when their inputs do)."""
    whole = next((i for i, ins in enumerate(instructions)
                  if ins.keyword == "COPY" and "." in [os.path.normpath(s) for s in copy_sources(ins.argument)[0]]),
                 len(instructions))
    runs = [i for i, ins in enumerate(instructions[:whole]) if ins.keyword == "RUN"]
    return runs[-1] + 1 if runs else 1


def base_key(torch_spec: str) -> str:
    """What the stand-in base depends on: the Debian suite and packages, the Python location, torch."""
    recipe = "\0".join((SUITE, *BASE_PACKAGES, BASE_PYTHON, torch_spec))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def layer_key(instructions: list[Instruction], context: Path, files: list[str], torch_spec: str) -> str:
    """What the cached layer depends on: the base, the steps' text, the files they copy, the code replaying them
    (this module and the Dockerfile reader; not the checks, which run on top of it)."""
    digest = hashlib.sha256(base_key(torch_spec).encode())
    for instruction in instructions[1:dependency_steps(instructions)]:
        digest.update(str(instruction).encode() + b"\0")
        if instruction.keyword == "COPY":
            for source, target in copy_plan(instruction, context, files, "/"):
                digest.update(target.encode() + b"\0" + source.read_bytes())
    for module in ("root.py", "dockerfile.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    return digest.hexdigest()[:16]


def pip_sources() -> tuple[tuple[Bind, ...], dict[str, str]]:
    """This machine's pip configuration for the install steps only: its settings as PIP_* variables and the local
    folders they name (wheel mirrors, certificates, constraints) mounted at the same paths; DNS too."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    env = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in ("global", "install", ":env:") and name:
            env["PIP_" + name.upper().replace("-", "_")] = value.strip().strip("'\"")
    env.update({key: value for key, value in os.environ.items() if key.startswith("PIP_")})
    paths = set()
    for value in env.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                paths.add(path.parent if path.name == "simple" else path)  # a PEP 503 index keeps files beside it
    binds = tuple(Bind(path, str(path)) for path in sorted(paths))
    return binds + (Bind(Path("/etc/resolv.conf"), "/etc/resolv.conf"),), env


def install_sources(cache: Path) -> tuple[tuple[Bind, ...], dict[str, str | None]]:
    """Mounts and variables for commands that install packages: this machine's pip sources and a wheel cache kept
    in `cache` (the image itself sets PIP_NO_CACHE_DIR; the cache changes only the check's speed)."""
    binds, pip_env = pip_sources()
    wheel_cache = cache / "pip"
    wheel_cache.mkdir(parents=True, exist_ok=True)
    binds += (Bind(wheel_cache, f"{HOST}/pip-cache", read_only=False),)
    return binds, {**pip_env, "PIP_NO_CACHE_DIR": None, "PIP_CACHE_DIR": f"{HOST}/pip-cache"}


def _build(final: Path, log: Callable[[str], None], make: Callable[[Path], None]) -> None:
    """`make` fills a fresh `<final>.partial`, which then replaces older builds of its kind and becomes `final`
    (so an interrupted build is never taken for a finished one)."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make(partial)
    kind = final.name.split("-")[0]
    stale = [old for old in final.parent.glob(f"{kind}-*") if old != partial]
    for number, old in enumerate(stale):  # one of each kind at a time: each is one or a few GB
        os.replace(old, old.with_name(f".deleting-{kind}-{os.getpid()}-{number}"))
    os.replace(partial, final)
    log(f"clean root: cached {final}")
    # deleting a few GB can take minutes (a disk mounted with `discard`): done in the background, and again by
    # the next build if this one was interrupted
    subprocess.Popen(["rm", "-rf", *map(str, final.parent.glob(".deleting-*"))], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _make_base(partial: Path, torch_spec: str, cache: Path, log: Callable[[str], None]) -> None:
    log(f"clean root: mmdebstrap --variant=apt --include={','.join(BASE_PACKAGES)} {SUITE}")
    done = subprocess.run(["mmdebstrap", "--variant=apt", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(partial)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"mmdebstrap failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    binds, env = install_sources(cache)
    existing = _existing(partial, binds)
    log(f"clean root: Python at {BASE_PYTHON} and {torch_spec} (standing in for the base image's CUDA torch)")
    done = Root(partial).run(f"python3 -m venv {BASE_PYTHON} && {BASE_PYTHON}/bin/pip install "
                             f"--no-warn-script-location {torch_spec}", binds=binds, env=env, network=True)
    if done.returncode != 0:
        raise UserError(f"installing {torch_spec} into the clean root failed (its output is above)")
    _remove_mount_points(partial, binds, existing)
    (partial / COMPLETE).write_text(torch_spec + "\n")


def build_layer(instructions: list[Instruction], context: Path, files: list[str], torch_spec: str,
                cache: Path, log: Callable[[str], None], warm: tuple[str, ...] = ()) -> Root:
    """The cached root after the Dockerfile's dependency steps, built when absent on the cached stand-in base
    (mmdebstrap, Python, torch). `warm`: modules imported once at the end, so that compile caches the checks'
    imports would rebuild every time (numba's, through rembg) are part of the layer."""
    steps = instructions[1:dependency_steps(instructions)]
    final = cache / f"root-{layer_key(instructions, context, files, torch_spec)}"
    state = Root(final)
    for instruction in steps:  # the image's ENV and WORKDIR are needed even when the files are cached
        if instruction.keyword in ("ARG", "ENV", "WORKDIR"):
            state.replay_state(instruction)
    if (final / COMPLETE).is_file():
        log(f"clean root: from the cache, {final}")
        return state
    cache.mkdir(parents=True, exist_ok=True)
    base = cache / f"base-{base_key(torch_spec)}"
    if not (base / COMPLETE).is_file():
        _build(base, log, lambda partial: _make_base(partial, torch_spec, cache, log))

    def make(partial: Path) -> None:
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(partial)], check=True)
        root = Root(partial)
        binds, env = install_sources(cache)
        existing = _existing(partial, binds)
        for instruction in steps:
            log(f"clean root: Dockerfile line {instruction.line}: {instruction}")
            root.replay(instruction, context, files, binds=binds, env=env)
        if warm:
            log(f"clean root: importing {len(warm)} modules once (their compile caches become part of the layer)")
            root.run(f"python -c {shlex.quote('import ' + ', '.join(warm))}", capture=True)
        _remove_mount_points(partial, binds, existing)

    _build(final, log, make)
    return state


def _existing(root: Path, binds: tuple[Bind, ...]) -> set[str]:
    """The bind targets and their parent folders that the root already has (they stay)."""
    found = set()
    for bind in binds:
        parts = bind.target.strip("/").split("/")
        found |= {"/".join(parts[:n]) for n in range(1, len(parts) + 1) if (root / "/".join(parts[:n])).exists()}
    return found


def _remove_mount_points(root: Path, binds: tuple[Bind, ...], existing: set[str]) -> None:
    """Remove the empty folders and files `Root.argv` created as mount points, so nothing of the host stays."""
    for bind in binds:
        relative = bind.target.strip("/")
        while relative and relative not in existing:
            path = root / relative
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
            elif path.is_file() and path.stat().st_size == 0:
                path.unlink()
            relative = os.path.dirname(relative)
