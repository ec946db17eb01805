"""Run a demo for several seeds and print the headline's min / median / max (the README demo table).

    .venv/bin/python scripts/demo_seeds.py detection --seeds 0 1 2
    .venv/bin/python scripts/demo_seeds.py segmentation --seeds 0 1 2 --isa avx2   # as on an AVX2-only CPU
    .venv/bin/python scripts/demo_seeds.py detection --seeds 0 1 2 -- --model.init_args.pretrained null  # scratch

Each seed is one ``python -m ravlt_pl.demo TASK --seed_everything SEED`` in its own process (its own
``trainer.default_root_dir`` under ``outputs/demo_seeds``), so runs share nothing but the generated
data set. ``--isa avx2`` caps PyTorch's CPU kernels (ATen dispatch and oneDNN) at AVX2, which reproduces
the float32 results of a CPU without AVX-512; ``--isa default`` caps them at PyTorch's unvectorised ATen
kernels and oneDNN's SSE4.1 code (a third set of float32 results, slower). Arguments after ``--`` go to every
run (CLI overrides). The detection and segmentation demos start from the shipped classification backbone
(``ravlt_pl/weights/demo_classifier.pt``, see ``ravlt_pl/demo.py``); the summary records which file (size and
SHA-256) each run started from. Per run it prints the headline, the wall time and the CPU
time (user + sys of the run's processes: on a loaded machine, CPU time / cores bounds the idle wall time
from below); the summary goes to ``outputs/demo_seeds/<task>_<isa>[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("classification", "detection", "segmentation")
ISA_ENV = {  # environment that caps PyTorch's CPU kernels at an instruction set; "native": no cap
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
REPORT_LINE = re.compile(r"^reports in (?P<dir>.+)$", re.MULTILINE)
STARTED_FROM = re.compile(r"\(started from (?P<weights>.+?)\)", re.MULTILINE)


def describe_weights(weights: str) -> dict:
    """The file a run started from, with its size and SHA-256 (``scratch``: none)."""
    path = Path(weights)
    if weights == "scratch" or not path.is_file():
        return {"file": weights}
    return {"file": weights, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of all waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_capability(isa: str) -> str:
    """The kernel set PyTorch dispatches to under ``ISA_ENV[isa]`` (checks that the cap takes effect)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, **ISA_ENV[isa]}
    return subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def run_seed(task: str, seed: int, isa: str, root: Path, extra: list[str], name: str) -> dict:
    """One demo run; returns its seed, headline name and value, wall and CPU seconds and report dir."""
    log_root = root / f"{name}_seed{seed}"
    command = [
        sys.executable,
        "-m",
        "ravlt_pl.demo",
        task,
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(log_root),
        *extra,
    ]
    cpu_before, start = children_cpu_seconds(), time.time()
    finished = subprocess.run(command, env={**os.environ, **ISA_ENV[isa]}, capture_output=True, text=True)
    wall, cpu = time.time() - start, children_cpu_seconds() - cpu_before
    if finished.returncode != 0:
        sys.exit(f"{task} seed {seed} failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    report_dir = Path(REPORT_LINE.search(finished.stdout)["dir"])
    started = STARTED_FROM.search(finished.stdout)
    reports = (json.loads(p.read_text()) for p in report_dir.glob("*.json"))
    headline = next(r for r in reports if isinstance(r, dict) and "headline" in r)["headline"]
    return {
        "seed": seed,
        "name": headline["name"],
        "value": headline["value"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "started_from": describe_weights(started["weights"]) if started else None,
        "reports": str(report_dir),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--isa",
        choices=sorted(ISA_ENV),
        default="native",
        help="cap PyTorch's CPU kernels at this instruction set (default: no cap)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo_seeds"))
    parser.add_argument("--tag", default="", help="added to the run folders' and the summary's names (e.g. scratch)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # to the demo (CLI overrides)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    name = "_".join(filter(None, (args.task, args.isa, args.tag)))
    capability = cpu_capability(args.isa)
    print(f"{args.task} [{args.isa}]: PyTorch CPU kernels {capability}", flush=True)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args.task, seed, args.isa, args.out, extra, name))
        r = runs[-1]
        print(
            f"{args.task} [{args.isa}] seed {seed}: {r['name']} = {r['value']:.4f}  "
            f"wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s, from {(r['started_from'] or {}).get('file', '?')}",
            flush=True,
        )
    values = [r["value"] for r in runs]
    summary = {
        "task": args.task,
        "isa": args.isa,
        "tag": args.tag,
        "cpu_capability": capability,
        "extra": extra,
        "runs": runs,
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{args.task} [{args.isa}] {runs[0]['name']} over seeds {args.seeds}: min {summary['min']:.4f} / "
        f"median {summary['median']:.4f} / max {summary['max']:.4f}"
    )


if __name__ == "__main__":
    main()
