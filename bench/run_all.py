"""Runs every benchmark of the project and rewrites BENCHMARKS.md (`make bench`).

    python bench/run_all.py [--only model,scaling,eval,data,trainer] [--demo_report demo_output/report/report.md]

Sections: model cost (bench_model.py), scaling (bench_scaling.py), evaluation throughput (bench_eval.py), data
(bench_data.py), trainer overhead (bench_trainer.py), the demo's report (when `make demo` has run), and the GPU
figures of bench/gpu.sh when a JSON file from a GPU run is given with --gpu_json. Sections not re-run keep their
previous text. Each section records its command; the header records machine, date and versions.
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
    "model": ("Model cost vs the bare backbone (CPU, 2 threads, fp32, batch 1)", ["bench/bench_model.py"]),
    "scaling": ("Scaling with image size and prototypes (CPU)", ["bench/bench_scaling.py"]),
    "eval": ("Evaluation throughput per metric (CPU)", ["bench/bench_eval.py"]),
    "data": ("Data preparation and transforms (CPU)", ["bench/bench_data.py"]),
    "trainer": ("Trainer overhead vs a plain loop (CPU, tiny config)", ["bench/bench_trainer.py"]),
}


def machine() -> str:
    import timm
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"timm {timm.__version__}, transformers {transformers.__version__}")


def run_section(name: str) -> str:
    title, command = SECTIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        full = [sys.executable, *command, "--json", str(out)]
        print(f"== {name}: {' '.join(full[1:])}", flush=True)
        subprocess.run(full, cwd=ROOT, check=True)
        result = json.loads(out.read_text())
        markdown = result.get("markdown") or "```json\n" + json.dumps(result, indent=2) + "\n```"
    date = datetime.date.today().isoformat()
    return f"## {title}\n\nCommand: `python {' '.join(command)}` ({date}; {machine()})\n\n{markdown}\n"


def gpu_section(path: Path) -> str:
    result = json.loads(path.read_text())
    lines = [f"## GPU ({result['device']}, {result['config']}, torch {result['torch']})", "",
             "| mode | dtype | batch | images/s | peak memory (MiB) |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        memory = "–" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        lines.append(f"| {row['mode']} | {row['dtype']} | {row['batch']} | {row['images_per_s']:.1f} | {memory} |")
    return "\n".join(lines) + "\n"


def split_sections(text: str) -> dict[str, str]:
    """Existing BENCHMARKS.md sections by their `<!-- section: name -->` marker."""
    parts = re.split(r"<!-- section: (\w+) -->\n", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--demo_report", default=str(ROOT / "demo_output" / "report" / "report.md"))
    parser.add_argument("--gpu_json", help="gpu_bench.json written by bench/gpu.sh on a GPU machine")
    args = parser.parse_args()
    target = ROOT / "BENCHMARKS.md"
    sections = split_sections(target.read_text()) if target.exists() else {}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    demo = Path(args.demo_report)
    if demo.exists():
        body = demo.read_text().split("\n", 1)[1]
        sections["demo"] = f"## `make demo` quality ({datetime.date.today().isoformat()}; {machine()})\n{body}"
    if args.gpu_json:
        sections["gpu"] = gpu_section(Path(args.gpu_json))
    write(target, sections)
    for name in names:  # BENCHMARKS.md is rewritten after every section, so a failure keeps what was measured
        sections[name] = run_section(name)
        write(target, sections)


def write(target: Path, sections: dict[str, str]) -> None:
    order = ["demo", *SECTIONS, "gpu"]
    text = "# Benchmarks\n\nWritten by `python bench/run_all.py` (`make bench`); each section names its command.\n\n"
    text += "\n".join(f"<!-- section: {name} -->\n{sections[name]}" for name in order if name in sections)
    temporary = target.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(target)
    print(f"wrote {target}", flush=True)


if __name__ == "__main__":
    main()
