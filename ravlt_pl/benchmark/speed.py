"""The model rows: each model's cases (inference per batch size and resolution, one training step), their
first-call memory, multiply-adds, interleaved timing and the ratios to ``--baseline``."""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F

from .memory import first_call_peak_mb
from .timing import autocast_ctx, run_interleaved
from .train_memory import measure_in_subprocess
from .zoo import build_model, image_multiply_adds

FLOP_COUNTER = "torch.utils.flop_counter / 2 (multiply-adds, plain path; ravlt_pl.flops)"


def make_cases(model, args, device, infer_model=None):
    """(key, images per call, fn): inference at each (res, bs) and one training step per res.

    ``infer_model`` (default: ``model``) runs the inference cases: a separate compiled copy under
    ``--freezing``, whose constants must not go stale when ``model`` trains.
    """
    infer_model = model if infer_model is None else infer_model
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cases = []
    for res in args.resolutions:
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, res, res, device=device).contiguous(memory_format=fmt)

            def infer(x=x):
                infer_model.eval()
                with torch.no_grad(), autocast_ctx(device, args.dtype):
                    infer_model(x)

            cases.append((("infer", res, bs), bs, infer))
        tb = args.train_batch_size
        if tb <= 0:  # inference only: no training step between the inference samples
            continue
        x = torch.randn(tb, 3, res, res, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (tb,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)

        def train(x=x, y=y, opt=opt):
            model.train()
            with autocast_ctx(device, args.dtype):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        cases.append((("train", res, tb), tb, train))
    return cases


def benchmark_models(args, device: torch.device, peak: float) -> tuple[list[dict], dict[str, str]]:
    """One result per (row, resolution) and the rows skipped (name: why); rows are ``--models`` (+ ``+compile``)."""
    rows, entries, info, skipped, macs, pbytes_mb = [], [], {}, {}, {}, {}
    for base in args.models:
        compiled = args.compile is not None and (not args.compile or base in args.compile)
        for row in [base] + ([base + "+compile"] if compiled else []):
            try:
                torch.manual_seed(0)
                m = build_model(base).to(device)  # a fresh model per row (training updates weights)
            except Exception as e:  # e.g. a name timm does not know
                skipped[row] = f"{type(e).__name__}: {e}"
                print(f"skipping {row}: {skipped[row]}")
                continue
            if args.channels_last:
                m = m.to(memory_format=torch.channels_last)
            for res in args.resolutions:  # counted once per (model, resolution), on the eager model
                if (base, res) not in macs:
                    macs[base, res] = image_multiply_adds(m, res, device)
            pbytes = sum(p.numel() * p.element_size() for p in m.parameters())
            pbytes_mb[row] = pbytes / 2**20
            info[row] = {"params_m": sum(p.numel() for p in m.parameters()) / 1e6, "mem": {}}
            infer_m = None
            if row != base:
                infer_m = torch.compile(copy.deepcopy(m).eval()) if args.freezing else None
                m = torch.compile(m)
            for key, images, fn in make_cases(m, args, device, infer_m):
                if key[0] == "train" and device.type == "cpu" and row == base:  # RSS, one process per model
                    step_mb = measure_in_subprocess(base, key[1], key[2], "cpu", args.dtype, args.threads)
                    info[row]["mem"][key] = pbytes / 2**20 + step_mb
                else:
                    info[row]["mem"][key] = first_call_peak_mb(fn, device, pbytes)
                entries.append((row, key, images, fn))
            rows.append(row)
    case_rank = {}  # case-major order: a noise burst hits one case of adjacent models, not one model
    entries.sort(key=lambda e: case_rank.setdefault(e[1], len(case_rank)))
    print(f"timing {len(rows)} models x {len(case_rank)} cases, {args.rounds} rounds")
    timings = run_interleaved(entries, args.warmup, args.rounds, args.min_sample_time)
    results = []
    for row in rows:
        base, mem = row.removesuffix("+compile"), info[row]["mem"]
        for res in args.resolutions:
            n_macs = macs[base, res]
            train_key = ("train", res, args.train_batch_size)
            r = {"model": row, "resolution": res, "params_m": info[row]["params_m"], "gmacs": n_macs / 1e9,
                 "flop_counter": FLOP_COUNTER,
                 "infer": {str(bs): timings[row, ("infer", res, bs)] for bs in args.batch_sizes},
                 "peak_mem_mb": {f"infer_bs{bs}": mem["infer", res, bs] for bs in args.batch_sizes}}  # fmt: skip
            if args.train_batch_size > 0:
                r["train"] = timings[row, train_key]
                r["peak_mem_mb"]["train"] = mem[train_key]
                r["train_step_mb"] = mem[train_key] - pbytes_mb[row]
            r["achieved_gflops"] = 2 * n_macs * r["infer"][str(max(args.batch_sizes))]["img_s"] / 1e9
            r["peak_share"] = r["achieved_gflops"] / peak
            results.append(r)
    add_ratios(results, args.baseline)
    return results, skipped


def add_ratios(results: list[dict], baseline: str) -> None:
    """Each result's images/s over ``baseline``'s at the same resolution (>1: faster), three estimators."""
    for r in results:
        base = next((b for b in results if b["model"] == baseline and b["resolution"] == r["resolution"]), None)
        cases = {f"infer_bs{bs}": (r["infer"][bs], base and base["infer"][bs]) for bs in r["infer"]}
        if "train" in r:
            cases["train"] = (r["train"], base and base["train"])
        r["ratio_vs_baseline"] = None if base is None else {k: t["img_s"] / b["img_s"] for k, (t, b) in cases.items()}
        # Paired: the median over rounds of the ratio within a round (neighbouring samples share the
        # machine's load); best: ratio of the fastest samples (load only ever slows a sample down).
        r["ratio_vs_baseline_paired"] = (
            None
            if base is None
            else {
                k: statistics.median(bt / tt for bt, tt in zip(b["samples_ms"], t["samples_ms"]))
                for k, (t, b) in cases.items()
            }
        )
        r["ratio_vs_baseline_best"] = None if base is None else {
            k: t["best_img_s"] / b["best_img_s"] for k, (t, b) in cases.items()}  # fmt: skip
