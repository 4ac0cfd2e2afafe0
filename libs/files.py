"""File I/O every part shares: safe loading of the official pickles, strict loading with readable errors,
atomic writes of our own artefacts (safetensors / JSON / images / HTML), file hashes. Training's own
checkpoints are libs/train/checkpoints.py."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from libs.errors import UserError

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported by the functions that read or write tensors: the JSON, hash and atomic-write
# helpers here serve the command lines' early checks too, which stay free of torch (tests/test_light_imports.py)

DOWNLOAD_HINT = "run `python tools/download.py` to fetch the official weights into models/"


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not match the model."""


def require_file(path: str | Path, what: str, hint: str = DOWNLOAD_HINT) -> Path:
    """Fail early, naming the file and how to get it, instead of deep inside a loader."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}\n  -> {hint}")
    return path


def safe_torch_load(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True` (a pickle can run code; this one cannot), errors naming the file.

    `mmap` maps the file instead of reading it (zip-format files; legacy pickles fall back to a read)."""
    import torch

    path = require_file(path, what)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read {what} {path}: {error}") from error


def load_torch_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a pickled state_dict safely, memory-mapped when possible."""
    state = safe_torch_load(path, what, mmap=True)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, expected a state_dict")
    return dict(state)


def key_mismatches(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Missing / unexpected / shape-mismatched tensor names between two name->tensor (or shape) maps,
    one readable line each kind; empty when they fit."""
    def shape(value: Any) -> tuple[int, ...]:
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(f"{k}: file {shape(found[k])} vs model {shape(expected[k])}"
                        for k in set(expected) & set(found) if shape(expected[k]) != shape(found[k]))
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            lines.append(f"  {title}: {shown}")
    return lines


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """`load_state_dict(strict=True)` with an error that names the missing/unexpected/mismatched keys."""
    problems = key_mismatches(module.state_dict(), state)
    if problems:
        raise CheckpointError("\n".join([f"{source} does not match {type(module).__name__} "
                                         "(is it the right file / config?)", *problems]))
    module.load_state_dict(state, strict=True, assign=_is_meta(module))


def _is_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


@contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `final_path`; rename it into place only if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the result the usual umask permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Atomic safetensors write (contiguous CPU copies, so views and GPU tensors are fine). Serialized in
    memory first, so a full disk is an OSError naming the file, not a library's internal error."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_bytes(save(tensors, metadata=dict(metadata) if metadata else None), path)


def save_torch(data: Any, path: str | Path) -> None:
    """Atomic `torch.save` (serialized in memory first, for the same reason as save_safetensors)."""
    import torch

    buffer = io.BytesIO()
    torch.save(data, buffer)
    save_bytes(buffer.getvalue(), path)


def save_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_safetensors(path: str | Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = require_file(path, what, hint="was it written by train.py?")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot read {what} {path}: {error}") from error


SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face model folder in safetensors: `model.safetensors`, or the shards
    its index names; empty when the folder has none (e.g. only `pytorch_model.bin`)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"cannot read {index}: {error}") from error
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


class LazySafetensors(Mapping[str, "torch.Tensor"]):
    """The tensors of safetensors files, each read from its (memory-mapped) file only when asked for:
    comparing a model with its file tensor by tensor never holds a second copy of the model.

    `names` (name -> key in the files) exposes the tensors under other names, and only those."""

    def __init__(self, files: list[Path], names: Mapping[str, str] | None = None):
        from safetensors import safe_open

        handles: dict[str, Any] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as error:  # noqa: BLE001 - re-raised with the file name
                raise CheckpointError(f"cannot read {path}: {error}") from error
            handles.update({key: handle for key in handle.keys()})
        self._keys = dict(names) if names is not None else {key: key for key in handles}
        absent = sorted(key for key in self._keys.values() if key not in handles)
        if absent:
            raise KeyError(f"not in {', '.join(map(str, files))}: {', '.join(absent[:8])}")
        self._handles = handles

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._keys[name]
        return self._handles[key].get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (nothing read)."""
        key = self._keys[name]
        return tuple(self._handles[key].get_slice(key).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's dtype, from the file header (None for one torch has no name for here)."""
        import torch

        key = self._keys[name]
        dtype = _SAFETENSORS_DTYPES.get(self._handles[key].get_slice(key).get_dtype())
        return getattr(torch, dtype) if dtype else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys


def load_json(path: str | Path, failure: Callable[[Exception], Exception]) -> Any:
    """A JSON file's content; when it cannot be read or parsed, the error `failure` makes of the reason (each
    caller names the file and its own fix)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: UnicodeDecodeError and JSONDecodeError
        raise failure(error) from error


def save_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_cache_dir() -> Path:
    """Where file hashes are remembered when the file's own folder is read-only (the graders' mounted models/)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unidiffuser-personalize" / "sha256"


def cached_sha256(path: str | Path) -> str:
    """sha256 of a (large) file, remembered while its size and mtime match: in `<file>.sha256` next to it,
    or, where that folder is read-only, in `hash_cache_dir()` (so a 3.8 GB U-ViT is not hashed on every run)."""
    path = Path(path)
    stat = path.stat()
    fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    resolved = str(path.resolve())
    sidecars = [path.with_name(path.name + ".sha256"),
                hash_cache_dir() / (hashlib.sha1(resolved.encode()).hexdigest() + ".json")]
    for sidecar in sidecars:
        try:
            known = json.loads(sidecar.read_text())
            if all(known[key] == value for key, value in fingerprint.items()):
                return known["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = file_sha256(path)
    for sidecar in sidecars:
        try:
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            save_json({"sha256": digest, "file": resolved, **fingerprint}, sidecar)
            break
        except OSError:
            continue  # a read-only folder: try the next place; with none writable, hash again next time
    return digest
