"""Speed features on CPU: torch.compile, bf16 autocast, gradient checkpointing, batched inference.

    python bench/bench_speed.py [--sections compile,bf16,checkpointing,batch] [--tiny] [--demo_dir demo_output]
                                [--max_rounds 6] [--json OUT]

ViT-B/14 reg4 with random weights (`--tiny`: the 4-block test-size ViT, for a quick check of the script), 2 threads.
Every timing uses bench/timing.py (interleaved rounds, disturbed repetitions flagged and excluded, min over clean
repetitions); every row states its clean/flagged counts.

- compile (224 px, batch 1): eager vs `torch.compile(model)` (inductor) for inference and for the training step;
  compile time = first call; max |logit difference| against eager.
- bf16 (224 px): fp32 vs `torch.autocast("cpu", torch.bfloat16)` for inference (batch 8) and the training step
  (batch 1); top-1 agreement with fp32 on the `make demo` test split when `--demo_dir` holds the demo's checkpoint.
- checkpointing (518 px, batch 1): training step with and without `model.activation_checkpointing_enable()`:
  time (interleaved) and peak RSS growth (a fresh process each).
- batch (224 px): IVPT inference images/s at batch 1, 8 and 32.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

FULL = dict(num_labels=200)
TINY = dict(n_pro="6,5,4", num_labels=7, backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8})
SIZES = {"small": (224, 64), "large": (518, 128)}  # (ViT-B/14 size, tiny size)
SECTIONS = ("compile", "bf16", "checkpointing", "batch")


def model_for(tiny: bool, size: str, **overrides):
    import torch

    from ivpt import IvptConfig, IvptForImageClassification

    torch.set_num_threads(2)
    torch.manual_seed(0)
    image_size = SIZES[size][1 if tiny else 0]
    return IvptForImageClassification(IvptConfig(**(TINY if tiny else FULL), image_size=image_size, **overrides))


def inputs(model, batch: int):
    import torch

    generator = torch.Generator().manual_seed(batch)
    size = model.config.image_size
    return (torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, model.config.num_labels, (batch,), generator=generator))


def inference_fn(model, images, autocast: bool = False):
    import torch

    def run():
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(images).logits

    return run


def train_step_fn(model, images, labels, autocast: bool = False):
    import torch

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def run():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(images, labels=labels).loss
        loss.backward()
        optimizer.step()

    return run


def timed(modes: dict, args) -> timing.TimingResult:
    return timing.time_modes(modes, min_rounds=min(3, args.max_rounds), max_rounds=args.max_rounds,
                             max_seconds=args.max_seconds,
                             log=lambda line: print(line, file=sys.stderr, flush=True))


def row(result: timing.TimingResult, name: str, batch: int = 1) -> dict:
    mode = result[name]
    return {"mode": name, "min_s": mode.min, "median_s": mode.median, "clean": len(mode.clean),
            "flagged": mode.flagged, "images_per_s": batch / mode.min}


def section_compile(args) -> dict:
    import torch

    model = model_for(args.tiny, "small")
    images, labels = inputs(model, 1)
    compiled = torch.compile(model)
    compile_s = {}
    for name, fn in (("inference", inference_fn(compiled, images)), ("train_step", train_step_fn(compiled, images,
                                                                                                  labels))):
        start = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - start
    with torch.no_grad():
        difference = (inference_fn(compiled, images)() - inference_fn(model, images)()).abs().max().item()
    result = timed({"eager inference": inference_fn(model, images),
                    "compiled inference": inference_fn(compiled, images),
                    "eager train step": train_step_fn(model, images, labels),
                    "compiled train step": train_step_fn(compiled, images, labels)}, args)
    rows = [row(result, name) for name in result.modes]
    return {"rows": rows, "compile_s": compile_s, "max_abs_logit_difference": difference,
            "speedup": {"inference": result["eager inference"].min / result["compiled inference"].min,
                        "train_step": result["eager train step"].min / result["compiled train step"].min},
            "summary": result.summary()}


def demo_agreement(demo_dir: Path) -> dict | None:
    """Top-1 agreement of bf16 autocast with fp32 on the demo's test split (None without a demo checkpoint)."""
    checkpoint = demo_dir / "ivpt"
    roots = sorted(demo_dir.glob("data/*/CUB_200_2011"))
    if not (checkpoint / "model.safetensors").exists() or not roots:
        return None
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    from ivpt import IvptForImageClassification

    model = IvptForImageClassification.from_pretrained(checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    root = next((r for r in roots if "pretrain" not in str(r)), roots[0])
    paths = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    test_ids = [line.split()[0] for line in (root / "train_test_split.txt").read_text().splitlines()
                if line.split()[1] == "0"]
    agree = 0
    for start in range(0, len(test_ids), 16):
        batch = [Image.open(root / "images" / paths[i]).convert("RGB") for i in test_ids[start:start + 16]]
        pixels = processor(batch, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            full = model(pixels).logits.argmax(-1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(pixels).logits.argmax(-1)
        agree += int((full == low).sum())
    return {"images": len(test_ids), "agreement": agree / len(test_ids), "data": root.parent.name}


def section_bf16(args) -> dict:
    model = model_for(args.tiny, "small")
    images8, _ = inputs(model, 8)
    images1, labels1 = inputs(model, 1)
    result = timed({"fp32 inference (batch 8)": inference_fn(model, images8),
                    "bf16 inference (batch 8)": inference_fn(model, images8, autocast=True),
                    "fp32 train step (batch 1)": train_step_fn(model, images1, labels1),
                    "bf16 train step (batch 1)": train_step_fn(model, images1, labels1, autocast=True)}, args)
    rows = [row(result, name, 8 if "batch 8" in name else 1) for name in result.modes]
    return {"rows": rows, "summary": result.summary(),
            "speedup": {
                "inference": result["fp32 inference (batch 8)"].min / result["bf16 inference (batch 8)"].min,
                "train_step": result["fp32 train step (batch 1)"].min / result["bf16 train step (batch 1)"].min},
            "demo_agreement": demo_agreement(Path(args.demo_dir)) if args.demo_dir else None}


def checkpointing_memory(tiny: bool, enabled: bool) -> float:
    model = model_for(tiny, "large")
    if enabled:
        model.activation_checkpointing_enable()
    images, labels = inputs(model, 1)
    step = train_step_fn(model, images, labels)
    before = reset_peak_rss_mib()
    step()
    return current_peak_rss_mib() - before


def reset_peak_rss_mib() -> float:
    """Hands the heap memory freed while the model was built back to the system and restarts the kernel's peak-RSS
    count (VmHWM); returns the resident size now. Without this, a step that reuses the memory the model's
    construction freed shows no growth at all (ru_maxrss only ever rises)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def current_peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def section_checkpointing(args) -> dict:
    import copy

    plain = model_for(args.tiny, "large")
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    images, labels = inputs(plain, 1)
    result = timed({"train step": train_step_fn(plain, images, labels),
                    "train step, gradient checkpointing": train_step_fn(checkpointed, images, labels)}, args)
    memory = {}
    for enabled in (False, True):
        command = [sys.executable, __file__, "--child_memory", str(int(enabled))] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
        memory[enabled] = float(out.strip().splitlines()[-1])
    return {"rows": [row(result, name) for name in result.modes], "summary": result.summary(),
            "time_cost": result["train step, gradient checkpointing"].min / result["train step"].min - 1,
            "peak_rss_growth_mib": {"plain": memory[False], "checkpointing": memory[True]}}


def section_batch(args) -> dict:
    model = model_for(args.tiny, "small")
    batches = (1, 8, 32)
    result = timed({f"batch {b}": inference_fn(model, inputs(model, b)[0]) for b in batches}, args)
    return {"rows": [row(result, f"batch {b}", b) for b in batches], "summary": result.summary()}


RUNNERS = {"compile": section_compile, "bf16": section_bf16, "checkpointing": section_checkpointing,
           "batch": section_batch}


def table(rows: list[dict], extra: dict | None = None) -> list[str]:
    lines = ["| mode | min (s) | median (s) | images/s | clean/flagged |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['images_per_s']:.2f} "
                     f"| {r['clean']}/{r['flagged']} |")
    return lines


def saved_percent(memory: dict) -> str:
    if memory["plain"] <= 0:  # a step too small to raise the peak left by building the model
        return "– %"
    return f"{100 * (1 - memory['checkpointing'] / memory['plain']):.0f} %"


def markdown(results: dict, tiny: bool) -> str:
    model = "tiny test ViT" if tiny else "ViT-B/14 reg4"
    lines = []
    if "compile" in results:
        r = results["compile"]
        lines += [f"torch.compile (inductor), {model} at {SIZES['small'][tiny]} px, batch 1:", "",
                  *table(r["rows"]), "",
                  f"Speed-up: inference {r['speedup']['inference']:.2f}x, training step "
                  f"{r['speedup']['train_step']:.2f}x; compile time (first call) inference "
                  f"{r['compile_s']['inference']:.0f} s, training step {r['compile_s']['train_step']:.0f} s; "
                  f"max |logit difference| vs eager {r['max_abs_logit_difference']:.1e}. {r['summary']}.", ""]
    if "bf16" in results:
        r = results["bf16"]
        agreement = r["demo_agreement"]
        agreement_text = ("top-1 agreement with fp32 on the demo test split: not measured (no `make demo` checkpoint "
                          "under --demo_dir)") if agreement is None else (
            f"top-1 agreement with fp32 on the demo test split: {100 * agreement['agreement']:.1f} % of "
            f"{agreement['images']} images")
        lines += [f"bf16 autocast on CPU, {model} at {SIZES['small'][tiny]} px:", "", *table(r["rows"]), "",
                  f"Speed-up: inference {r['speedup']['inference']:.2f}x, training step "
                  f"{r['speedup']['train_step']:.2f}x; {agreement_text}. {r['summary']}.", ""]
    if "checkpointing" in results:
        r = results["checkpointing"]
        memory = r["peak_rss_growth_mib"]
        lines += [f"Gradient checkpointing, {model} at {SIZES['large'][tiny]} px, batch 1, training step:", "",
                  *table(r["rows"]), "",
                  f"Time cost {100 * r['time_cost']:+.1f} %; peak RSS growth {memory['plain']:.0f} MiB -> "
                  f"{memory['checkpointing']:.0f} MiB ({saved_percent(memory)} saved; fresh process each). "
                  f"{r['summary']}.", ""]
    if "batch" in results:
        r = results["batch"]
        lines += [f"Batched inference, {model} at {SIZES['small'][tiny]} px:", "", *table(r["rows"]), "",
                  f"{r['summary']}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--tiny", action="store_true", help="the test-size ViT (a quick check of the script)")
    parser.add_argument("--demo_dir", default="demo_output", help="`make demo` output, for the bf16 agreement")
    parser.add_argument("--max_rounds", type=int, default=6)
    parser.add_argument("--max_seconds", type=float, default=120, help="cap on the timed rounds of one section")
    parser.add_argument("--json")
    parser.add_argument("--child_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        print(checkpointing_memory(args.tiny, bool(int(args.child_memory))))
        return
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        parser.error(f"--sections: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    results = {}
    for name in names:
        results[name] = RUNNERS[name](args)
        print(markdown({name: results[name]}, args.tiny), flush=True)
    text = markdown(results, args.tiny)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "markdown": text}, indent=2, default=str))


if __name__ == "__main__":
    main()
