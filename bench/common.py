"""Shared benchmark plumbing: sizes, random-weight models, timing, peak memory, FLOP counts, result lines.

Every bench script builds its models here with random weights from the real configs (no checkpoint is
downloaded or read), so `full` measures the real v1 architecture on any machine, and all scripts time,
measure memory and record results the same way: one JSON line per configuration, medians over repeats
with the warm-up excluded, ratios taken against a baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

from libs.config import REPO_ROOT, latent_shape, load_config
from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.loading import CAPTION_DECODER_PREFIX as CAPTION_PREFIX
from libs.models.loading import quiet_transformers
from libs.outputs import check_output_folder, only
from libs.precision import autocast  # noqa: F401 - re-exported for the bench scripts
from libs.tiny_world import write_base_models, write_clip_tokenizer

SIZES = ("tiny", "small", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RUN_ID = uuid.uuid4().hex[:12]
"""Groups the lines of one process: ratios are only meaningful between lines of the same run."""

RESULT_FIELDS = ("bench", "run_id", "time", "config", "size", "device", "device_name", "torch", "threads",
                 "sizes", "repeats", "warmup", "median_s", "times_s", "warmup_times_s", "peak_mem_bytes",
                 "mem_base_bytes", "working_mem_bytes", "mem_kind", "speedup_vs_baseline")
"""Fields every result line has (bench-specific fields come on top); tests/test_bench.py checks them."""

H100_BF16_DENSE_FLOPS = 989e12
"""NVIDIA's H100 SXM bf16 dense tensor-core peak: the yardstick for model-FLOP utilisation."""


# --- sizes -------------------------------------------------------------------------------------------


def bench_config(size: str) -> ml_collections.ConfigDict:
    """The config of a bench size, with `bench_clip` giving the CLIP towers' sizes.

    tiny: the tiny world (toy widths, 8x8 latent). small: the real token layout (64x64 latent, 1105
    tokens, text/clip dims of v1) at width 512 and depth 4, a slim VAE (ch 32) and a 2-layer CLIP text
    tower at the real width. full: the real v1 U-ViT, VAE and CLIP ViT-L/14 text / ViT-B/32 image towers.
    """
    if size not in SIZES:
        raise ValueError(f"size {size!r} not in {SIZES}")
    if size == "tiny":
        config = load_config("tiny")
        config.bench_clip = ml_collections.ConfigDict(config.tiny_clip.to_dict())
        return config
    config = load_config("unidiffuser_v1")
    real_clip = dict(text_hidden=768, text_layers=12, text_heads=12, vision_hidden=768, vision_layers=12,
                     vision_heads=12, image_size=224, patch_size=32, projection_dim=config.clip_img_dim)
    if size == "small":
        config.nnet.update(embed_dim=512, depth=4, num_heads=8)
        config.autoencoder.update(ch=32)
        real_clip["text_layers"] = 2
    config.name = f"bench_{size}"
    config.bench_clip = ml_collections.ConfigDict(real_clip)
    return config


def size_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture numbers a result line records, so lines of different sizes are never confused."""
    nnet = config.nnet
    return {"embed_dim": nnet.embed_dim, "depth": nnet.depth, "num_heads": nnet.num_heads,
            "tokens": uvit_tokens(nnet), "z_shape": list(latent_shape(config)), "resolution": config.resolution,
            "vae_ch": config.autoencoder.ch, "clip_text_layers": config.bench_clip.text_layers}


# --- models with random weights ------------------------------------------------------------------------


def write_random_checkpoints(config: ml_collections.ConfigDict, folder: str | Path,
                             seed: int = 0) -> ml_collections.ConfigDict:
    """Random weights for every model of `config`, written in the official file formats into `folder`;
    returns a copy of the config whose paths point there.

    The benches then load through the production loaders (load_uvit, load_pipeline, build_models ...),
    so they time what train.py and sample.py run. At full size the folder holds ~4.8 GB (uvit_v1.pth
    alone is 3.8 GB).
    """
    local = copy.deepcopy(config)
    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_base_models(config, folder, lambda: {
        f"{CAPTION_PREFIX}{k}": v for k, v in CaptionDecoderPrefix(**config.caption_decoder).state_dict().items()})
    text_dir, image_dir = folder / "clip-vit-large-patch14", folder / "clip-vit-base-patch32"
    write_clip_tokenizer(text_dir)
    with quiet_transformers():
        CLIPTextModel(_clip_text_config(config.bench_clip)).save_pretrained(text_dir)
        CLIPVisionModelWithProjection(_clip_vision_config(config.bench_clip)).save_pretrained(image_dir)
    local.paths.update({name: str(path) for name, path in files.items()})
    local.paths.update(clip_text=str(text_dir), clip_text_hub="", clip_img=str(image_dir), clip_img_hub="")
    return local


def write_personalization(config: ml_collections.ConfigDict, folder: str | Path, seed: int = 0) -> Path:
    """A personalization as train.py writes it with the config's recipe (U-ViT LoRA of `train.rank` on the
    default targets with small random B, a `<new1>` token), for the random base models of `config`."""
    from libs.adapters.lora import LoraSpec, add_lora, uvit_lora_modules
    from libs.models.loading import load_text_encoder, load_uvit
    from libs.personalization import save_personalization

    nnet, text_encoder = load_uvit(config), load_text_encoder(config)
    spec = LoraSpec(r=int(config.train.rank), alpha=float(config.train.alpha), target_modules=uvit_lora_modules(nnet))
    add_lora(nnet, spec)
    generator = torch.Generator().manual_seed(seed)
    for name, param in nnet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.01
    text_encoder.add_modifier_token("<new1>", "boy")
    save_personalization(folder, {"modifier_token": "<new1>", "class_word": "boy", "text_encoder_mode": "token",
                                  "uvit_lora": spec.to_dict()}, nnet, text_encoder)
    return Path(folder)


@contextmanager
def random_checkpoints(config: ml_collections.ConfigDict, seed: int = 0) -> Iterator[ml_collections.ConfigDict]:
    """`write_random_checkpoints` into a temporary folder that lives as long as the context (at full
    size ~4.8 GB: point TMPDIR at a disk with room)."""
    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        yield write_random_checkpoints(config, tmp, seed)


def write_scorer_clip(folder: Path, sizes: ml_collections.ConfigDict, seed: int = 0) -> Path:
    """A random full CLIPModel (image tower of `sizes`, text tower of `sizes`) with the real tokenizer: what
    libs.score.scorer.Scorer loads as its CLIP ViT-B/32 (random_checkpoints' image folder holds the tower alone)."""
    torch.manual_seed(seed)
    write_clip_tokenizer(folder)
    with quiet_transformers():
        config = CLIPConfig(text_config=_clip_text_config(sizes).to_dict(),
                            vision_config=_clip_vision_config(sizes).to_dict(), projection_dim=sizes.projection_dim)
        CLIPModel(config).save_pretrained(folder)
    return folder


def _clip_text_config(sizes: ml_collections.ConfigDict) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=sizes.text_hidden, intermediate_size=4 * sizes.text_hidden,
                          num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                          max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, hidden_act="quick_gelu", projection_dim=sizes.projection_dim)


def _clip_vision_config(sizes: ml_collections.ConfigDict) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                            num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                            image_size=sizes.image_size, patch_size=sizes.patch_size, hidden_act="quick_gelu",
                            projection_dim=sizes.projection_dim)


def uvit_inputs(config: ml_collections.ConfigDict, batch: int, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random (img, clip_img, text, t_img, t_text, data_type) in the shapes the U-ViT takes."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    t_img = (torch.rand(batch, generator=generator) * 999 + 1).to(device)
    return (randn(batch, *latent_shape(config)), randn(batch, 1, config.clip_img_dim),
            randn(batch, config.num_text_tokens, config.text_dim), t_img, torch.zeros(batch, device=device),
            torch.full((batch,), config.data_type, dtype=torch.long, device=device))


# --- devices, precision, timing, memory ---------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Named laps with the device synchronised at every boundary (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        synchronize(device)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.laps.values())


@dataclass
class Measured:
    """Wall seconds of each timed repeat, the peak memory over them, what each call returned, and the
    seconds of the untimed warm-up calls (where compilation and autotuning show)."""

    times: list[float]
    memory: dict[str, Any]
    outputs: list[Any]
    warmup_times: list[float]


def interleaved_runs(runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                     warmup: int) -> dict[str, Measured]:
    """Time several configurations round-robin: all warm-ups first, then repeat r of each before r + 1.

    On a shared machine the load drifts; interleaving spreads the drift over every configuration instead
    of penalising whichever ran during a busy minute, so ratios taken in one run stay fair. Warm-up calls
    (first-call allocation, autotuning, compilation) are kept apart from the timed repeats.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    found = {name: Measured([], {}, [], []) for name in runs}
    for name, fn in runs.items():
        for _ in range(warmup):
            watch = Stopwatch(device)
            fn()
            watch.lap("warmup")
            found[name].warmup_times.append(watch.total)
            print(f"  warm-up {name}: {watch.total:.3f} s", flush=True)
    for repeat in range(repeats):
        for name, fn in runs.items():
            with peak_memory(device) as memory:
                watch = Stopwatch(device)
                output = fn()
                watch.lap("run")
            entry = found[name]
            entry.times.append(watch.total)
            entry.outputs.append(output)
            print(f"  [{repeat + 1}/{repeats}] {name}: {watch.total:.3f} s", flush=True)
            if not entry.memory or memory["peak_mem_bytes"] > entry.memory["peak_mem_bytes"]:
                entry.memory = memory
    return found


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _proc_status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so RSS counts live memory only (freed
    blocks kept by malloc would otherwise hide the next configuration's working memory)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: `5` into clear_refs), so peaks are per configuration."""
    _release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory of the block: CUDA `max_memory_allocated`, or on CPU the process's peak RSS.

    Yields a dict that is filled on exit with peak_mem_bytes, mem_base_bytes (what was held on entry,
    weights included) and mem_kind. Where the CPU peak cannot be reset it is the process lifetime peak,
    and mem_kind says so.
    """
    result: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.update(peak_mem_bytes=torch.cuda.max_memory_allocated(device), mem_base_bytes=base,
                      mem_kind="cuda_max_allocated")
        return
    resettable = _reset_rss_peak()
    base_kib = _proc_status_kib("VmRSS")
    yield result
    if resettable:
        peak, kind = _proc_status_kib("VmHWM") * 1024, "cpu_peak_rss"
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if platform.system() == "Darwin" else 1024
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "cpu_lifetime_peak_rss"
    result.update(peak_mem_bytes=peak, mem_base_bytes=(base_kib or 0) * 1024, mem_kind=kind)


# --- FLOPs -------------------------------------------------------------------------------------------------


def uvit_tokens(nnet: ml_collections.ConfigDict) -> int:
    """[t_img, t_text, data_type, text tokens, clip_img, patches]: 1105 for v1."""
    return 3 + nnet.num_text_tokens + 1 + (nnet.img_size // nnet.patch_size) ** 2


def uvit_forward_flops(nnet: ml_collections.ConfigDict, batch: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of one U-ViT forward: ~2·(block params)·tokens + 4·L²·d per block.

    Blocks: qkv (3d²), proj (d²), fc1+fc2 (2·mlp·d²) on every token; out blocks add skip_linear (2d²);
    attention adds QK^T and AV (2·L²·d each). Embeddings and output heads on their own tokens.
    Elementwise work (norms, softmax, GELU) is left out, as in the usual MFU convention.
    """
    d, tokens = nnet.embed_dim, uvit_tokens(nnet)
    patches = (nnet.img_size // nnet.patch_size) ** 2
    patch_dim = nnet.in_chans * nnet.patch_size ** 2
    blocks = 2 * (nnet.depth // 2) + 1
    per_block = 2 * tokens * (4 * d * d + 2 * int(nnet.mlp_ratio * d) * d) + 4 * tokens * tokens * d
    skips = (nnet.depth // 2) * 2 * tokens * 2 * d * d
    io = 2 * d * (2 * patches * patch_dim + 2 * nnet.num_text_tokens * nnet.text_dim + 2 * nnet.clip_img_dim)
    time_mlp = 2 * 2 * 8 * d * d if nnet.mlp_time_embed else 0
    return batch * (blocks * per_block + skips + io + time_mlp)


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's FlopCounterMode sees in `fn` (works on the meta device: no memory, no compute)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --- results -----------------------------------------------------------------------------------------------


RESULTS_FILES = only("*.jsonl", "*.md", "*.log")
"""What a results folder holds: the benches' JSON lines and the written record of a measured session
(bench/results/h200-2026-11-27.md and its command log)."""


def common_parser(description: str) -> argparse.ArgumentParser:
    """Flags every bench script takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (see bench/common.py)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <bench>.jsonl is appended")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is steadier on a shared machine")
    return parser


def start(args: argparse.Namespace) -> torch.device:
    """Check --results-dir (libs.outputs), apply the common flags (threads) and return the device to run on."""
    check_output_folder(args.results_dir, "--results-dir", RESULTS_FILES)
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def write_result(results_dir: Path, bench: str, record: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Append one JSON line to `<results_dir>/<bench>.jsonl`, with run id, time and environment in front."""
    line = {"bench": bench, "run_id": RUN_ID,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **environment(device), **record}
    missing = [field for field in RESULT_FIELDS if field not in line]
    if missing:
        raise KeyError(f"result line for {bench} lacks {missing}")
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / f"{bench}.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
    return line


def timing_fields(measured: Measured, repeats: int, warmup: int) -> dict[str, Any]:
    """The timing and memory part of a result line."""
    return {"repeats": repeats, "warmup": warmup, "median_s": median(measured.times),
            "times_s": [round(t, 6) for t in measured.times],
            "warmup_times_s": [round(t, 6) for t in measured.warmup_times], **measured.memory,
            "working_mem_bytes": max(0, measured.memory["peak_mem_bytes"] - measured.memory["mem_base_bytes"])}


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f}"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> None:
    """A fixed-width table: columns are (header, key, formatter)."""
    cells = [[fmt(row.get(key)) for _, key, fmt in columns] for row in rows]
    widths = [max([len(header)] + [len(c[i]) for c in cells]) for i, (header, _, _) in enumerate(columns)]
    print("  ".join(header.rjust(w) for (header, _, _), w in zip(columns, widths)))
    for row in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


def fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda value: "-" if value is None else f"{value:.{digits}f}"


def fmt_str(value: Any) -> str:
    return "-" if value is None else str(value)
