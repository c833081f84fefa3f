"""Summaries of a benchmark run: medians, ratios to the peers, log-log slopes, FLOP rate;
written as JSON, a markdown table and a PNG (time and memory against length, log-log)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .flops import littlebird_forward_flops, littlebird_train_flops
from .runner import Plan, split_system
from .systems import PEERS, Size

LABELS = {"littlebird": "LittleBird", "bigbird": "BigBird", "longformer": "Longformer", "bert": "BERT (full, SDPA)"}
METRICS = ("train_s", "infer_s", "train_gb", "infer_gb")


def label(name: str) -> str:
    base, kernel = split_system(name)
    return LABELS.get(base, base) + (f" [{kernel}]" if ":" in name else "")


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``log(value)`` against ``log(length)``."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def summarise(results: list[dict], plan: Plan, slope_range: tuple[int, int] = (2048, 32768)) -> dict:
    size = Size.named(plan.size)
    probes = [r["flops_per_s"] for r in results if r.get("system") == "matmul" and "flops_per_s" in r]
    rate = statistics.median(probes) if probes else None
    table: dict[str, dict[int, dict]] = {}
    for name in plan.systems:
        table[name] = {}
        for length in plan.lengths:
            runs = [r for r in results if r["system"] == name and r["length"] == length]
            cell: dict = {}
            if any("skipped" in r for r in runs):
                cell["skipped"] = next(r["skipped"] for r in runs if "skipped" in r)
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                cell["error"] = errors[0]
            ok = [r for r in runs if "train" in r or "infer" in r]
            for mode in ("train", "infer"):
                got = [r[mode] for r in ok if mode in r]
                if got:
                    cell[f"{mode}_s"] = statistics.median(t for g in got for t in g["times_s"])
                    cell[f"{mode}_gb"] = statistics.median(g["peak_bytes"] for g in got) / 1e9
                    cell[f"{mode}_samples"] = sum(len(g["times_s"]) for g in got)
            kernels = [r["kernels"] for r in ok if "kernels" in r]
            if kernels:
                cell["kernels"] = kernels[0]
            # The yardstick is the probe taken beside this length's runs: load on a shared
            # machine drifts over a run, so the run-wide median can be far from it.
            here = [r["flops_per_s"] for r in results if r.get("system") == "matmul" and r.get("length") == length]
            rate_here = statistics.median(here) if here else rate
            if split_system(name)[0] == "littlebird" and "train_s" in cell and rate_here:
                cell["matmul_flops_per_s"] = rate_here
                cell["train_flops"] = littlebird_train_flops(size, length)
                cell["train_flop_rate"] = cell["train_flops"] / cell["train_s"]
                cell["train_fraction_of_matmul"] = cell["train_flop_rate"] / rate_here
            if split_system(name)[0] == "littlebird" and "infer_s" in cell and rate_here:
                cell["infer_fraction_of_matmul"] = littlebird_forward_flops(size, length) / cell["infer_s"] / rate_here
            table[name][length] = cell
    ratios: dict[str, dict[str, dict[int, dict]]] = {}
    for name in plan.systems:
        if split_system(name)[0] != "littlebird":
            continue
        ratios[name] = {}
        for peer in [p for p in plan.systems if split_system(p)[0] in PEERS]:
            ratios[name][peer] = {}
            for length in plan.lengths:
                mine, theirs = table[name][length], table[peer][length]
                ratios[name][peer][length] = {
                    m: mine[m] / theirs[m] for m in METRICS if m in mine and m in theirs and theirs[m] > 0
                }
    lo, hi = slope_range
    slopes = {
        name: {
            m: loglog_slope([(L, c.get(m)) for L, c in table[name].items() if lo <= L <= hi and m in c])
            for m in METRICS
        }
        for name in plan.systems
    }
    return {
        "plan": plan.__dict__,
        "size": size.__dict__,
        "matmul_flops_per_s": rate,
        "matmul_probes": probes,
        "table": {n: {str(L): c for L, c in t.items()} for n, t in table.items()},
        "ratios": {n: {p: {str(L): r for L, r in pr.items()} for p, pr in rs.items()} for n, rs in ratios.items()},
        "slopes": slopes,
        "slope_range": list(slope_range),
    }


def _fmt(cell: dict, key: str, unit: str = "") -> str:
    if key in cell:
        return f"{cell[key]:.3g}{unit}"
    if "error" in cell:
        return "failed"
    if "skipped" in cell:
        return "skipped"
    return "-"


def markdown(summary: dict, command: str | None = None) -> str:
    plan, table, ratios = summary["plan"], summary["table"], summary["ratios"]
    systems, lengths = plan["systems"], [str(L) for L in plan["lengths"]]
    s = summary["size"]
    out = []
    if command:
        out += [f"Command: `{command}`", ""]
    rate = summary["matmul_flops_per_s"]
    allocator = f"`{plan['allocator']}` preloaded for every system" if plan.get("allocator") else "the default allocator"
    out += [
        f"Size: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, FFN {s['ffn']}, vocab {s['vocab']}; "
        f"batch 1, fp32, {plan['threads']} threads; {plan['rounds']} rounds x {plan['steps']} timed steps, medians. "
        + (f"Matmul rate (fp32 4096^3 GEMM, median of {len(summary['matmul_probes'])} probes): {rate / 1e9:.0f} GFLOP/s." if rate else ""),
        "",
        (f"Times with {allocator}; peak memory from a second process per configuration that hands freed "
         "memory back to the OS at once (`--release-memory`), so it counts what a step holds."
         if plan.get("release_memory") else
         f"Times and peak memory with {allocator}: the peak includes freed memory the allocator keeps."),
        "",
    ]
    for title, key, unit in (("Training step (forward + backward), seconds", "train_s", ""),
                             ("Training step peak memory, GB", "train_gb", ""),
                             ("Inference step (no grad), seconds", "infer_s", ""),
                             ("Inference step peak memory, GB", "infer_gb", "")):
        lb = list(ratios)
        header = ["length"] + [label(n) for n in systems]
        header += [f"{label(n)} / {label(p)}" for n in lb for p in ratios[n]]
        out += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for L in lengths:
            row = [L] + [_fmt(table[n][L], key, unit) for n in systems]
            row += [(f"{ratios[n][p][L][key]:.2f}x" if key in ratios[n][p][L] else "-") for n in lb for p in ratios[n]]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    lo, hi = summary["slope_range"]
    out += [f"**Log-log slopes ({lo} to {hi} tokens, least squares over the lengths measured)**", "",
            "| system | train time | infer time | train memory | infer memory |", "|---|---|---|---|---|"]
    for n in systems:
        sl = summary["slopes"][n]
        out.append("| " + " | ".join([label(n)] + [f"{sl[m]:.2f}" if sl[m] is not None else "-" for m in METRICS]) + " |")
    out.append("")
    for n in ratios:
        rows = [(L, table[n][L]) for L in lengths if "train_fraction_of_matmul" in table[n][L]]
        if rows:
            out += [f"**{label(n)} achieved FLOP rate (analytic model FLOPs / step time), fraction of the matmul rate "
                    "probed beside the same length's runs**", "",
                    "| length | train GFLOP | train GFLOP/s | matmul GFLOP/s | train fraction | infer fraction |",
                    "|---|---|---|---|---|---|"]
            for L, c in rows:
                inf = f"{c['infer_fraction_of_matmul']:.0%}" if "infer_fraction_of_matmul" in c else "-"
                out.append(f"| {L} | {c['train_flops'] / 1e9:.0f} | {c['train_flop_rate'] / 1e9:.0f} | "
                           f"{c['matmul_flops_per_s'] / 1e9:.0f} | {c['train_fraction_of_matmul']:.0%} | {inf} |")
            out.append("")
    notes = [f"- {label(n)} at {L}: {c.get('error') or c.get('skipped')}" for n in systems for L, c in table[n].items()
             if "error" in c or "skipped" in c]
    if notes:
        out += ["Not measured:", ""] + notes + [""]
    return "\n".join(out)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    table, slopes = summary["table"], summary["slopes"]
    for i, name in enumerate(summary["plan"]["systems"]):
        color = f"C{i}"
        for ax, key, ylabel in ((axes[0], "s", "step time (s)"), (axes[1], "gb", "peak memory (GB)")):
            for mode, style in (("train", "-o"), ("infer", "--s")):
                pts = sorted((int(L), c[f"{mode}_{key}"]) for L, c in table[name].items() if f"{mode}_{key}" in c)
                if not pts:
                    continue
                sl = slopes[name].get(f"{mode}_{key}")
                tag = f"{label(name)} {mode}" + (f" (slope {sl:.2f})" if sl is not None else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=tag, markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    s = summary["size"]
    fig.suptitle(f"batch 1, fp32, hidden {s['hidden']}, {s['layers']} layers; solid: training step, dashed: inference")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(summary: dict, results: list[dict], out_dir: Path, command: str | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "png": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps({"command": command, "summary": summary, "runs": results}, indent=1))
    paths["markdown"].write_text(markdown(summary, command))
    plot(summary, paths["png"])
    return paths
