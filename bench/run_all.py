"""Runs every benchmark of the project and rewrites BENCHMARKS.md (`make bench`, about 115 minutes on 2 cores).

    python bench/run_all.py [--only model,profile,profile_batch8,allocator,speed,scaling,eval_passes,eval,data,trainer]
                            [--gpu_json gpu_bench.json] [--gpu_profile_json profile.json]
                            [--demo_report demo_output/report/report.md]

Sections, with the minutes each took (2 cores of an AVX2 EPYC, 2026-12-04/05): model cost and goals at batch 1 and 8
(bench_model.py, 61 in session 14: the pairs timed in lockstep, rounds of two calls a pair, 12 rounds at batch 1 in
20 minutes, a 2100 s cap that allowed 7 rounds at batch 8, plus a fresh process per mode for memory), speed features
(bench_speed.py, 11: inductor compiling, and bf16 on a CPU without native bf16 runs 60 s training steps), profile of
the extra time and per-block times (profile_model.py --per_block, 1), the same for inference at batch 8, where the
inference goal is hardest to measure (5), page faults under two glibc settings (bench_allocator.py, 13: four
processes at batch 8, two lockstep rounds each), scaling (bench_scaling.py, 13: lockstep rounds, up to 10 rounds or
120 s a point; 224 px is the n_pro 17,14,11,8,5 row, 518 px the model section), evaluation backbone passes
(bench_eval_passes.py, <1), evaluation throughput (bench_eval.py, 2), data (bench_data.py, 1.5), trainer overhead
(bench_trainer.py, 2). Two parts: `--only model` (~60 minutes) and the rest (~55). Also the demo's report (when
`make demo` has run) and the GPU figures of bench/gpu.sh (`--gpu_json`) and bench/profile_gpu.py (`--gpu_profile_json`).
Sections not re-run keep their previous text; BENCHMARKS.md is rewritten after every section; a section that fails
(e.g. an impossible ratio on a busy machine) is written with its table and the reason when its script got that far,
else keeps its previous text; the run goes on and exits non-zero at the end.
Each section records its command; the header records machine, date and versions. Run it when nothing else uses
the CPU: timings disturbed by other processes are flagged and excluded (bench/timing.py), so a busy machine gives
fewer clean repetitions.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "model": ("Model cost vs the bare backbone, and the goals (CPU, 2 threads, fp32)",
              ["bench/bench_model.py", "--config", "full", "--max_seconds", "2100"]),
    "speed": ("Speed features: torch.compile, bf16, gradient checkpointing, batching (CPU)", ["bench/bench_speed.py"]),
    "profile": ("Where IVPT's time goes beyond its backbone (torch.profiler, CPU)",
                ["bench/profile_model.py", "--per_block"]),
    "profile_batch8": ("Where IVPT's inference time goes at batch 8 (torch.profiler, CPU)",
                       ["bench/profile_model.py", "--batch", "8", "--comparisons", "inference", "--per_block",
                        "--per_block_rounds", "4"]),
    "allocator": ("Page faults at batch 8, and glibc's allocator settings (CPU)", ["bench/bench_allocator.py"]),
    "scaling": ("Scaling with image size and prototypes (CPU)", ["bench/bench_scaling.py", "--image_sizes", "392"]),
    "eval_passes": ("Evaluation cost in backbone passes", ["bench/bench_eval_passes.py"]),
    "eval": ("Evaluation throughput per metric (CPU)", ["bench/bench_eval.py", "--classes", "2"]),
    "data": ("Data preparation and transforms (CPU)", ["bench/bench_data.py"]),
    "trainer": ("Trainer overhead vs a plain loop (CPU, tiny config)", ["bench/bench_trainer.py", "--rounds", "3"]),
}


def cpu_description(cpuinfo: str, capability: str) -> str:
    """The CPU's model name, x86 family/model (two virtual machines both called "AMD EPYC" can be Zen 3 and Zen 4) and
    the vector instruction set torch uses (`AVX2`, `AVX512`, ...), plus `bf16` when the CPU has AVX-512 BF16 or AMX:
    bf16 autocast is several times faster than fp32 with those and several times slower without."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    family = f"family {fields['cpu family']} model {fields['model']}, " if "cpu family" in fields else ""
    bf16 = ", bf16" if flags & {"avx512_bf16", "amx_bf16"} else ""
    return f"{name} ({family}{capability}{bf16})"


def machine() -> str:
    import timm
    import torch
    import transformers

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = cpu_description(cpuinfo, torch.backends.cpu.get_cpu_capability())
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"timm {timm.__version__}, transformers {transformers.__version__}")


def run_section(name: str) -> str:
    title, command = SECTIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        full = [sys.executable, *command, "--json", str(out)]
        print(f"== {name}: {' '.join(full[1:])}", flush=True)
        completed = subprocess.run(full, cwd=ROOT)
        if not out.exists():  # failed before writing anything: the caller keeps the previous text
            raise subprocess.CalledProcessError(completed.returncode, full)
        result = json.loads(out.read_text())
        markdown = result.get("markdown") or "```json\n" + json.dumps(result, indent=2) + "\n```"
    date = datetime.date.today().isoformat()
    text = f"## {title}\n\nCommand: `python {' '.join(command)}` ({date}; {machine()})\n\n{markdown}\n"
    if completed.returncode != 0:  # e.g. an impossible ratio: the section shows the table and why it failed
        raise SectionFailed(text)
    return text


class SectionFailed(RuntimeError):
    """A benchmark exited non-zero after writing its results (which say why); `args[0]` is the section text."""


def gpu_section(path: Path, title: str, command: str) -> str:
    """A section of figures measured on a GPU machine (bench/gpu.sh, bench/profile_gpu.py), dated when measured (the
    json's `date`; today for a json written before the scripts recorded it)."""
    result = json.loads(path.read_text())
    date = result.get("date") or datetime.date.today().isoformat()
    return (f"## {title} ({result['device']}, recorded {date})\n\nCommand: `{command}`\n\n"
            f"{result['markdown']}\n")


def split_sections(text: str) -> dict[str, str]:
    """Existing BENCHMARKS.md sections by their `<!-- section: name -->` marker."""
    parts = re.split(r"<!-- section: (\w+) -->\n", text)
    return {parts[i]: parts[i + 1].rstrip("\n") + "\n" for i in range(1, len(parts) - 1, 2)}


def demo_section(report: Path) -> str:
    """The demo's report under a heading dated when `make demo` wrote it (not when this run copied it)."""
    written = datetime.datetime.fromtimestamp(report.stat().st_mtime, datetime.timezone.utc).date().isoformat()
    body = report.read_text().split("\n", 1)[1]  # the report's own title line is replaced
    return f"## `make demo` quality ({written}; {machine()})\n{body}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--demo_report", default=str(ROOT / "demo_output" / "report" / "report.md"))
    parser.add_argument("--gpu_json", help="gpu_bench.json written by bench/gpu.sh on a GPU machine")
    parser.add_argument("--gpu_profile_json", help="the json of bench/profile_gpu.py run on a GPU machine")
    args = parser.parse_args()
    target = ROOT / "BENCHMARKS.md"
    sections = split_sections(target.read_text()) if target.exists() else {}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    demo = Path(args.demo_report)
    if demo.exists():
        sections["demo"] = demo_section(demo)
    if args.gpu_json:
        sections["gpu"] = gpu_section(Path(args.gpu_json), "GPU", "bash bench/gpu.sh")
    if args.gpu_profile_json:
        sections["gpu_profile"] = gpu_section(Path(args.gpu_profile_json), "GPU training-step profile",
                                              "python bench/profile_gpu.py --batch 4,16 --steps 3 --json profile.json")
    write(target, sections)
    failed = []
    for name in names:  # BENCHMARKS.md is rewritten after every section, so a failure keeps what was measured
        try:
            sections[name] = run_section(name)
        except SectionFailed as failure:
            failed.append(name)
            sections[name] = failure.args[0]
            print(f"== {name}: FAILED, written with the reason (see the error above)", flush=True)
        except subprocess.CalledProcessError:
            failed.append(name)
            print(f"== {name}: FAILED, previous text kept (see the error above)", flush=True)
            continue
        write(target, sections)
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


def write(target: Path, sections: dict[str, str]) -> None:
    order = ["demo", *SECTIONS, "gpu", "gpu_profile"]
    order += [name for name in sections if name not in order]  # sections of older layouts are kept, at the end
    text = "# Benchmarks\n\nWritten by `python bench/run_all.py` (`make bench`); each section names its command.\n\n"
    bodies = {name: body.rstrip("\n") for name, body in sections.items()}  # one blank line between sections
    text += "\n".join(f"<!-- section: {name} -->\n{bodies[name]}\n" for name in order if name in bodies)
    temporary = target.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(target)
    print(f"wrote {target}", flush=True)


if __name__ == "__main__":
    main()
