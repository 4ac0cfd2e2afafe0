"""Seconds per prompt and peak memory of text-to-image sampling (n images, `steps` solver steps, CFG),
broken down into text encoding, the denoising loop and VAE decode: our sampler against a baseline that
reproduces the official loop's costs, measured in the same run.

    python -m bench.bench_sampling --size small --threads 1 --steps 3 --repeats 2 --modes pipeline  # CPU
    python -m bench.bench_sampling --size full                   # GPU: 50 steps, every mode but compile

Modes
  baseline        the official loop's real costs: cond and uncond as two forwards per step, the LoRA (r=64
                  on the default targets) left unmerged, SDPA attention (what the official U-ViT code picks
                  on torch >= 2), fp32 weights under autocast (fp16 on CUDA as the official script; none on
                  CPU), no_grad, one VAE decode of the whole batch
  pipeline        libs.sample.pipeline.T2IPipeline.generate exactly as sample.py runs it (batched CFG, merged
                  LoRA, SDPA, matmul weights cast to the inference dtype, VAE decoded one image at a time)
  ablations       `pipeline` with one thing changed, through a bench loop that calls the same
                  t2i_sample: unbatched_cfg, unmerged_lora, math_attention (explicit fp32 softmax, the
                  official fallback), inference_mode, no_vae_slicing, bf16 / fp16 / fp32 weights,
                  compile (torch.compile of the whole U-ViT), compile_cudagraphs (the same with
                  mode="reduce-overhead": CUDA graphs), compile_blocks (regional: each block
                  compiled, UViT.compile_blocks), cudnn_attention / flash_attention / efficient_attention
                  (SDPA held to one CUDA kernel; CUDA only). Compilation shows in warmup_times_s.
  load/*          loading the caption decoder as the official code does (GPT-2 built and loaded) against
                  libs.caption_decoder.load_caption_decoder (prefix layers only), from the same file

Weights are random, written as checkpoint files and loaded through load_pipeline / load_personalization
(bench.common.random_checkpoints); the prompt is fixed and the noise comes from libs.sample.pipeline's per-image
generators. With fewer than 50 steps, s_per_prompt_at_50_steps scales the denoising time to 50.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from bench.common import (DTYPES, H100_BF16_DENSE_FLOPS, Stopwatch, autocast, bench_config, common_parser,
                          fmt_float, fmt_str, gib, interleaved_runs, median, print_table, random_checkpoints,
                          size_summary, start, timing_fields, uvit_forward_flops, write_result)
from libs.config import latent_shape
from libs.diffusion import N_TRAIN_STEPS
from libs.diffusion import keyed_generator as sample_generator
from libs.dpm_solver import dpm_solver_sample
from libs.errors import run_cli
from libs.adapters.lora import LoraSpec, add_lora, merge_lora, uvit_lora_modules
from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.loading import CAPTION_DECODER_PREFIX as PREFIX
from libs.models.loading import load_caption_decoder, load_uvit
from libs.personalization import load_personalization, save_personalization
from libs.precision import inference_dtype, place_for_inference
from libs.sample.pipeline import T2IPipeline, combine_joint, load_pipeline, split_joint, t2i_sample, to_pil_images

BENCH = "bench_sampling"
PROMPT = "a photo of a boy standing in the wild, smiling at the camera"
SEED = 1234
REFERENCE_STEPS = 50
LORA_ALPHA = 32.0


@dataclass(frozen=True)
class Mode:
    """How one sampling run is done; the defaults are the pipeline's."""

    name: str
    batched_cfg: bool = True
    merged: bool = True
    attention: str = "sdpa"
    dtype: str | None = None  # weights' and autocast dtype; None: the pipeline's inference dtype
    cast_weights: bool = True  # False: fp32 weights under autocast, as the official script
    inference_mode: bool = False
    vae_slice: int | None = 1
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode for `compile` (None: its default)
    compile_blocks: bool = False
    sdpa_backend: str | None = None  # SDPA held to this kernel (torch.nn.attention.SDPBackend name)


PIPELINE = Mode("pipeline")
BASELINE = Mode("baseline", batched_cfg=False, merged=False, attention="sdpa", cast_weights=False, vae_slice=None)
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
OPT_IN = {"compile", "compile_cudagraphs", "compile_blocks"}  # minutes of compilation: only when asked for
ABLATIONS = {mode.name: mode for mode in (
    replace(PIPELINE, name="unbatched_cfg", batched_cfg=False),
    replace(PIPELINE, name="unmerged_lora", merged=False),
    replace(PIPELINE, name="math_attention", attention="math"),
    replace(PIPELINE, name="inference_mode", inference_mode=True),
    replace(PIPELINE, name="no_vae_slicing", vae_slice=None),
    replace(PIPELINE, name="bf16", dtype="bf16"),
    replace(PIPELINE, name="fp16", dtype="fp16"),
    replace(PIPELINE, name="fp32", dtype="fp32"),
    replace(PIPELINE, name="compile", compile=True),
    replace(PIPELINE, name="compile_cudagraphs", compile=True, compile_mode="reduce-overhead"),
    replace(PIPELINE, name="compile_blocks", compile_blocks=True),
    *(replace(PIPELINE, name=f"{backend}_attention", sdpa_backend=backend) for backend in SDPA_BACKENDS),
)}
MODES = {"baseline": BASELINE, "pipeline": PIPELINE, **ABLATIONS}


def default_modes(device: torch.device) -> list[str]:
    """Everything but compilation (opt-in: minutes of compiling) and dtypes equal to the pipeline's (fp16
    is left out on CPU, where it has no fast kernels, and so are the CUDA attention kernels)."""
    pipeline_dtype = inference_dtype(device)
    skip = OPT_IN | {name for name, dtype in DTYPES.items() if dtype == pipeline_dtype}
    if device.type == "cpu":
        skip |= {"fp16"} | {f"{backend}_attention" for backend in SDPA_BACKENDS}
    return [name for name in MODES if name not in skip]


def mode_dtype(mode: Mode, device: torch.device) -> torch.dtype:
    return DTYPES[mode.dtype] if mode.dtype else inference_dtype(device)


def two_pass_sample(nnet: nn.Module, text: Tensor, z_init: Tensor, clip_img_init: Tensor, steps: int, scale: float,
                    data_type: int, text_noise_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """The official t2i loop: `true_uncond` CFG with the conditional and unconditional passes as two
    separate forwards per solver step (everything else as libs.sample.pipeline.t2i_sample)."""
    z_shape, clip_img_dim = tuple(z_init.shape[1:]), clip_img_init.shape[-1]
    types = torch.full((z_init.shape[0],), data_type, dtype=torch.long, device=z_init.device)

    def noise_fn(x: Tensor, t_net: Tensor) -> Tensor:
        z, clip_img = split_joint(x, z_shape, clip_img_dim)
        z_out, clip_out, _ = nnet(z, clip_img, text, t_net, torch.zeros_like(t_net), types)
        cond = combine_joint(z_out, clip_out).float()
        z_out, clip_out, _ = nnet(z, clip_img, text_noise_fn(text), t_net, torch.full_like(t_net, N_TRAIN_STEPS), types)
        uncond = combine_joint(z_out, clip_out).float()
        return cond + scale * (cond - uncond)

    x = dpm_solver_sample(noise_fn, combine_joint(z_init, clip_img_init), steps)
    return split_joint(x, z_shape, clip_img_dim)[0]


class Networks:
    """The U-ViT variants the modes need: the unmerged fp32 LoRA model (the baseline's), the pipeline's
    own (merged, inference dtype), and copies made from the first: unmerged or merged, fp32 or placed for
    inference in a low dtype as the pipeline does, compiled whole ("model", "model:<torch.compile mode>"),
    block by block ("blocks") or not (at full size each copy is 1.9-3.8 GB: run fewer modes when memory
    is short)."""

    def __init__(self, unmerged_fp32: nn.Module, pipeline: T2IPipeline):
        self.base = unmerged_fp32
        self.copies: dict[tuple[bool, torch.dtype, str | None], nn.Module] = {
            (False, torch.float32, None): unmerged_fp32, (True, pipeline.dtype, None): pipeline.nnet}

    def get(self, merged: bool, dtype: torch.dtype, compiled: str | None = None) -> nn.Module:
        key = (merged, dtype, compiled)
        if key not in self.copies:
            if compiled is not None and compiled.startswith("model"):  # "model" or "model:<mode>"
                mode = compiled.partition(":")[2] or None
                self.copies[key] = torch.compile(self.get(merged, dtype), mode=mode)
            elif compiled == "blocks":
                model = copy.deepcopy(self.get(merged, dtype))
                model.compile_blocks()
                self.copies[key] = model
            else:
                model = copy.deepcopy(self.base)
                if merged:
                    merge_lora(model)
                self.copies[key] = place_for_inference(model, None, dtype)
        return self.copies[key]


def sdpa_backend(name: str | None) -> ContextManager[Any]:
    """SDPA held to one kernel (cudnn, flash, efficient), or torch's own choice for None."""
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def weight_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@contextmanager
def phase_laps(pipeline: T2IPipeline, watch: Stopwatch) -> Iterator[None]:
    """Lap the stopwatch at the phase boundaries through module hooks, so the real `generate` is timed
    without being changed: noise setup | text encoder + prefix | denoising loop | VAE decode | the rest."""
    handles = [pipeline.text_encoder.register_forward_pre_hook(lambda *_: watch.lap("other")),
               pipeline.caption_decoder.register_forward_hook(lambda *_: watch.lap("text")),
               pipeline.autoencoder.vae.post_quant_conv.register_forward_pre_hook(lambda *_: watch.lap("denoise")),
               pipeline.autoencoder.vae.decoder.register_forward_hook(lambda *_: watch.lap("decode"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    watch.lap("other")


def make_run(mode: Mode, pipeline: T2IPipeline, networks: Networks, n_images: int, steps: int,
             device: torch.device) -> Callable[[], dict[str, float]]:
    """One prompt's images in `mode`; returns the phase seconds."""
    dtype = mode_dtype(mode, device)
    compiled = (f"model:{mode.compile_mode or ''}".rstrip(":") if mode.compile
                else "blocks" if mode.compile_blocks else None)
    nnet = networks.get(mode.merged, dtype if mode.cast_weights else torch.float32, compiled)
    config = pipeline.config
    prompts = [PROMPT] * n_images

    def generators() -> list[torch.Generator]:
        return [sample_generator(SEED, 0, i) for i in range(n_images)]

    def real_pipeline() -> None:
        pipeline.generate(prompts, generators(), steps=steps)

    def bench_loop() -> None:
        gens = generators()
        with torch.inference_mode() if mode.inference_mode else torch.no_grad():
            z_init = torch.stack([torch.randn(latent_shape(config), generator=g) for g in gens]).to(device)
            clip_img_init = torch.stack([torch.randn(1, config.clip_img_dim, generator=g) for g in gens]).to(device)

            def text_noise(text: Tensor) -> Tensor:
                return torch.stack([torch.randn(tuple(text.shape[1:]), generator=g) for g in gens]).to(text)

            text = pipeline.encode_text(prompts)
            with autocast(device, dtype):
                if mode.batched_cfg:
                    z, _ = t2i_sample(nnet, text, z_init, clip_img_init, steps, config.sample.scale,
                                      config.sample.cfg_mode, config.data_type, empty_text=pipeline.empty_text,
                                      text_noise_fn=text_noise)
                else:
                    z = two_pass_sample(nnet, text, z_init, clip_img_init, steps, config.sample.scale,
                                        config.data_type, text_noise)
            to_pil_images(pipeline.autoencoder.decode(z.float(), slice_size=mode.vae_slice))

    if mode == PIPELINE and nnet is not pipeline.nnet:
        raise RuntimeError("the pipeline mode must run the pipeline's own network")
    body = real_pipeline if mode == PIPELINE else bench_loop

    def run() -> dict[str, float]:
        nnet.set_attention_mode(mode.attention)
        watch = Stopwatch(device)
        with phase_laps(pipeline, watch), sdpa_backend(mode.sdpa_backend):
            body()
        return dict(watch.laps)

    return run


# --- loading the caption decoder: GPT-2 or not ---------------------------------------------------------


def gpt2_config(config, size: str) -> GPT2Config:
    """The captioner's GPT-2: the real `gpt2` architecture (vocabulary grown by one token), or at tiny
    size a 2-layer one at the tiny prefix width."""
    if size == "tiny":
        return GPT2Config(vocab_size=50258, n_positions=128, n_embd=config.caption_decoder.prefix_dim, n_layer=2,
                          n_head=2)
    return GPT2Config(vocab_size=50258, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def official_caption_decoder_state(config, gpt_config: GPT2Config) -> dict[str, Tensor]:
    """A state in caption_decoder.pth's layout: `module.`-prefixed GPT-2 and prefix layers."""
    modules = {"gpt": GPT2LMHeadModel(gpt_config), "": CaptionDecoderPrefix(**config.caption_decoder)}
    return {f"{PREFIX}{name}{'.' if name else ''}{k}": v
            for name, module in modules.items() for k, v in module.state_dict().items()}


def official_caption_decoder_load(path: Path, config, gpt_config: GPT2Config, device: torch.device) -> nn.Module:
    """What the official code pays at start-up: the whole checkpoint into a GPT-2 captioner on the device."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    gpt_prefix = f"{PREFIX}gpt."
    gpt = GPT2LMHeadModel(gpt_config)
    gpt.load_state_dict({k[len(gpt_prefix):]: v for k, v in state.items() if k.startswith(gpt_prefix)})
    prefix = CaptionDecoderPrefix(**config.caption_decoder)
    prefix.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if not k.startswith(gpt_prefix)})
    return nn.ModuleDict({"gpt": gpt, "prefix": prefix}).to(device).eval()


def load_runs(config, size: str, device: torch.device, folder: Path) -> dict[str, Callable[[], Any]]:
    """Both ways of loading the same caption_decoder.pth, written to `folder`."""
    path = folder / "caption_decoder.pth"
    gpt = gpt2_config(config, size)
    torch.save(official_caption_decoder_state(config, gpt), path)
    local = copy.deepcopy(config)
    local.paths.caption_decoder = str(path)
    return {"load/official_gpt2": lambda: official_caption_decoder_load(path, config, gpt, device),
            "load/prefix_only": lambda: load_caption_decoder(local, device)}


# --- the run -----------------------------------------------------------------------------------------------


def write_lora(config, folder: Path, rank: int) -> Path:
    """A personalization folder with a U-ViT LoRA of `rank` on the default targets (what train.py writes)."""
    nnet = load_uvit(config, "cpu")
    spec = LoraSpec(r=rank, alpha=LORA_ALPHA, target_modules=uvit_lora_modules(nnet))
    add_lora(nnet, spec)
    save_personalization(folder, {"uvit_lora": spec.to_dict(), "text_encoder_mode": "frozen"}, nnet, None)
    return folder


def baseline_network(config, restore_path: Path, pipeline: T2IPipeline, device: torch.device) -> nn.Module:
    """The base U-ViT with the personalization loaded as sample.py loads it, left unmerged and in fp32."""
    nnet = load_uvit(config, device)
    load_personalization(restore_path, nnet, pipeline.text_encoder)
    return nnet.eval()


def sampling_record(mode: Mode, measured, args: argparse.Namespace, config, device: torch.device,
                    model_bytes: int) -> dict[str, Any]:
    laps = {key: median([out.get(key, 0.0) for out in measured.outputs])
            for key in ("text", "denoise", "decode", "other")}
    record = {"config": mode.name, "size": args.size,
              "sizes": {**size_summary(config), "n_images": args.n_images, "steps": args.steps,
                        "lora_rank": args.lora_rank},
              "mode": {k: v for k, v in vars(mode).items() if k != "name"},
              "dtype": str(mode_dtype(mode, device)).removeprefix("torch."),
              **timing_fields(measured, args.repeats, args.warmup)}
    denoise_flops = args.steps * uvit_forward_flops(config.nnet, 2 * args.n_images)
    record.update(s_per_prompt=record["median_s"], text_s=laps["text"], denoise_s=laps["denoise"],
                  decode_s=laps["decode"], other_s=laps["other"], denoise_s_per_step=laps["denoise"] / args.steps,
                  s_per_prompt_at_50_steps=record["median_s"] + laps["denoise"] * (REFERENCE_STEPS / args.steps - 1),
                  denoise_model_flops=denoise_flops, denoise_tflops_per_s=denoise_flops / laps["denoise"] / 1e12,
                  model_bytes=model_bytes)
    record["standalone_peak_est_bytes"] = model_bytes + record["working_mem_bytes"]
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device):
        record["denoise_fraction_of_h100_bf16_peak"] = record["denoise_tflops_per_s"] * 1e12 / H100_BF16_DENSE_FLOPS
    return record


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    names = args.modes or default_modes(device)
    unknown = sorted(set(names) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if "baseline" not in names:
        names = ["baseline", *names]
    modes = [MODES[name] for name in names]
    with random_checkpoints(config) as config, tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
        restore_path = write_lora(config, Path(tmp) / "lora", args.lora_rank)
        pipeline = load_pipeline(config, device, restore_path)
        networks = Networks(baseline_network(config, restore_path, pipeline, device), pipeline)
        runs = {mode.name: make_run(mode, pipeline, networks, args.n_images, args.steps, device) for mode in modes}
        measured = interleaved_runs(runs, device, args.repeats, args.warmup)
        others = weight_bytes(pipeline.autoencoder, pipeline.text_encoder, pipeline.caption_decoder)
        records = []
        for mode in modes:
            nnet = networks.get(mode.merged, mode_dtype(mode, device) if mode.cast_weights else torch.float32)
            records.append(sampling_record(mode, measured[mode.name], args, config, device,
                                           others + weight_bytes(nnet)))
        load_measured = interleaved_runs(load_runs(config, args.size, device, Path(tmp)), device, args.repeats,
                                         args.warmup)
    baseline_s = records[0]["median_s"]
    pipeline_s = next((r["median_s"] for r in records if r["config"] == "pipeline"), None)
    rows = []
    for record in records:
        record["speedup_vs_baseline"] = baseline_s / record["median_s"]
        record["speedup_vs_pipeline"] = pipeline_s / record["median_s"] if pipeline_s else None
        rows.append(write_result(args.results_dir, BENCH, record, device))
    official = median(load_measured["load/official_gpt2"].times)
    for name, entry in load_measured.items():
        record = {"config": name, "size": args.size, "sizes": size_summary(config),
                  **timing_fields(entry, args.repeats, args.warmup)}
        record["speedup_vs_baseline"] = official / record["median_s"]
        rows.append(write_result(args.results_dir, BENCH, record, device))
    print(f"{BENCH} size={args.size} images={args.n_images} steps={args.steps} device={rows[0]['device_name']} "
          f"torch={torch.__version__}")
    print_table(rows, [("mode", "config", fmt_str), ("s/prompt", "median_s", fmt_float(3)),
                       ("text", "text_s", fmt_float(3)), ("denoise", "denoise_s", fmt_float(3)),
                       ("decode", "decode_s", fmt_float(3)), ("@50 steps", "s_per_prompt_at_50_steps", fmt_float(2)),
                       ("work GiB", "working_mem_bytes", gib), ("x baseline", "speedup_vs_baseline", fmt_float(2)),
                       ("x pipeline", "speedup_vs_pipeline", fmt_float(2))])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--steps", type=int, default=REFERENCE_STEPS, help="solver steps (model evaluations)")
    parser.add_argument("--n-images", type=int, default=3, help="images per prompt, denoised as one batch")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of the U-ViT LoRA (default targets)")
    parser.add_argument("--modes", nargs="+", default=None,
                        help=f"modes to run (baseline always runs); default: all but the compile modes (and, on CPU, fp16 and the CUDA attention kernels). Known: {list(MODES)}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
