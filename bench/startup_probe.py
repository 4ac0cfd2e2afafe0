"""One start-up of sample.py or train.py, phase by phase, in a fresh process: what bench_startup times.

    python bench/startup_probe.py --repo <checkout> --program sample --config <config.json> --restore <folder>

Runs against any checkout of this repository (an older revision too: it uses only what sample.py and
train.py have long used: their own imports, libs.sample.pipeline.load_base / personalize / merge_lora,
libs.train.Plan / build_models / make_optimizer), so one bench run can compare revisions. Prints one JSON
line: the seconds of each phase since the interpreter began this file (`merge`: the time inside
libs.sample.pipeline's merge_lora calls, taken out of `personalize`), the changed-parameter count (sample), peak
memory. The config is the JSON of an ml_collections config whose paths point at the model files.
"""
import time

STARTED = time.perf_counter()

import argparse  # noqa: E402 - the clock starts before anything is imported
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def status_bytes(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", required=True, help="the checkout whose code runs")
    parser.add_argument("--program", choices=("sample", "train"), required=True)
    parser.add_argument("--config", required=True, help="JSON of the config (paths to the model files)")
    parser.add_argument("--restore", default=None, help="personalization folder (sample)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="train: the frozen weights' dtype (fp32, fp16, bf16)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    os.chdir(args.repo)
    phases: dict[str, float] = {}
    last = STARTED

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases[name] = now - last
        last = now

    import ml_collections
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    __import__(args.program)  # everything the entry script imports
    lap("import")
    rss_after_import = status_bytes("VmRSS")
    config = ml_collections.ConfigDict(json.loads(Path(args.config).read_text()))
    device = torch.device(args.device)
    result: dict = {}
    if args.program == "sample":
        import libs.sample.pipeline
        from libs.sample.pipeline import load_base, personalize

        merging = [0.0]
        merge_lora = libs.sample.pipeline.merge_lora

        def timed_merge(*merge_args, **merge_kwargs):  # split the merge off: on a CPU it dominates, on a GPU not
            started = time.perf_counter()
            try:
                return merge_lora(*merge_args, **merge_kwargs)
            finally:
                merging[0] += time.perf_counter() - started

        libs.sample.pipeline.merge_lora = timed_merge
        base = load_base(config, device)
        lap("load_base")
        pipeline = personalize(base, args.restore, count_parameters=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        lap("personalize")
        phases["personalize"] -= merging[0]
        phases["merge"] = merging[0]
        result["finetuned_parameters"] = pipeline.finetuned_parameters
    else:
        from accelerate import Accelerator

        from libs.prompts import fill_prompt
        from libs.train import Plan, build_models, make_optimizer

        Accelerator(cpu=device.type == "cpu")  # what train() starts with
        lap("accelerate")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        with tempfile.TemporaryDirectory() as out:
            plan = Plan(config, Path("synthetic"), Path(out), "boy", "<new1>", "boy",
                        fill_prompt(config.train.instance_prompt, "<new1>", "boy"), None)
            models = build_models(plan, device, dtype)
            make_optimizer(models.trainable(), config.train)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            lap("build_models")
            result["trainable_parameters"] = sum(p.numel() for _, p in models.trainable())
    result.update(phases=phases, total_s=time.perf_counter() - STARTED, peak_rss_bytes=status_bytes("VmHWM"),
                  rss_after_import_bytes=rss_after_import,
                  cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
