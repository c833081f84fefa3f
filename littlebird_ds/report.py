"""The pipeline's report: ``OUT/report.md``, ``OUT/report.json`` and PNG plots.

Reads what the stages wrote (``metrics.jsonl`` of every training stage, the evaluation JSON of
every QA run) and checks the three results the recipe must show:

1. Padding Insertion works: QA trained on contexts of at most ``qa_length`` tokens keeps its F1
   at the longest test lengths within 10 points of its F1 at ``qa_length``, and beats the same
   run without Padding Insertion there.
2. Distillation works: the student's final hidden states are close to the teacher's
   (cosine similarity on held-out text, logged by the distill stage as ``eval_cosine``).
3. Pretraining pays: the pipeline's QA model beats a randomly initialised LittleBird fine-tuned
   the same way on the same data.

Results 1 and 3 compare QA models, which means nothing while they are near chance: then every
run is within 10 points of every other, and which one is ahead is noise. So they count as shown
only when the (pretrained) model with Padding Insertion reaches ``MIN_LEARNED_F1`` at
``qa_length``; below that the report says "not shown" and why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .utils.io import atomic_write_json, atomic_write_text

TRAINING_STAGES = ("teacher", "distill", "further")
#: F1 at the training length below which a QA comparison is not evidence (near chance).
MIN_LEARNED_F1 = 10.0
QA_RUNS = {
    "pretrained_pi": "pretrained + Padding Insertion",
    "pretrained_no_pi": "pretrained, no Padding Insertion",
    "random_pi": "random init + Padding Insertion",
}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
    return rows


def plot_eval_curve(metrics: Path, key: str, png: Path, title: str, target: float | None = None) -> Path | None:
    """Plot ``eval_<key>`` against step from a run's ``metrics.jsonl`` (a resumed run's records
    included) into ``png``; ``None`` when the run logged no such value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({r["step"]: r[f"eval_{key}"] for r in read_metrics(Path(metrics)) if f"eval_{key}" in r}.items())
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    fig.tight_layout()
    tmp = Path(png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return Path(png)


def _find(obj, key: str):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def f1_by_length(result: dict) -> dict[int, dict]:
    """``{length: {"f1", "exact_match", "total"}}`` from an evaluate-qa result."""
    by = _find(result, "by_length") or {}
    out = {}
    for label, m in by.items():
        nums = re.findall(r"\d+", str(label))
        if nums and isinstance(m, dict) and "f1" in m:
            out[int(nums[-1])] = m
    return dict(sorted(out.items()))


def _plot_losses(out: Path, curves: dict[str, list[dict]]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if any("loss" in r for r in v)}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        ax.plot(*zip(*tr), label="train loss", lw=1)
        ev = [(r["step"], r[k]) for r in rows for k in r if k in ("eval_loss", "eval_mlm_loss") and "step" in r]
        if ev:
            ax.plot(*zip(*ev), "o-", label="validation loss", ms=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "report_losses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_f1(out: Path, runs: dict[str, dict[int, dict]], train_length: int) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(runs.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by in runs.items():
        if by:
            ax.plot(list(by), [m["f1"] for m in by.values()], "o-", label=QA_RUNS.get(name, name))
    ax.axvline(train_length, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("F1")
    ax.set_title(f"QA F1 against context length (trained at <= {train_length} tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "report_qa_f1.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_curves(out: Path) -> dict[str, list[dict]]:
    """``metrics.jsonl`` records of every training stage and QA run, by name."""
    curves = {s: read_metrics(out / s / "metrics.jsonl") for s in TRAINING_STAGES}
    for run in QA_RUNS:
        curves[f"qa/{run}"] = read_metrics(out / "qa" / run / "metrics.jsonl")
    return curves


def _not_learned(f1: float | None, train_len: int) -> dict:
    """``{"passed": False, "not_shown": reason}`` when a QA comparison is not evidence, else ``{}``."""
    if f1 is not None and f1 >= MIN_LEARNED_F1:
        return {}
    return {"passed": False,
            "not_shown": f"the pretrained model with Padding Insertion has F1 {f1 if f1 is None else round(f1, 1)} at "
                         f"{train_len} tokens, below {MIN_LEARNED_F1:g}: it has not learned the task, so this "
                         "comparison is noise; train QA longer (--set qa_steps=...)"}


def summarize(out: Path, settings: dict, curves: dict[str, list[dict]] | None = None) -> dict:
    """Everything the report states, as one JSON-able dict."""
    curves = read_curves(out) if curves is None else curves
    runs: dict[str, dict[int, dict]] = {}
    for run in QA_RUNS:
        p = out / "evaluate" / f"{run}.json"
        runs[run] = f1_by_length(json.loads(p.read_text())) if p.exists() else {}

    def last(rows, key):
        vals = [r[key] for r in rows if key in r]
        return vals[-1] if vals else None

    def first(rows, key):
        vals = [r[key] for r in rows if key in r]
        return vals[0] if vals else None

    train_len = int(settings.get("qa_length", 512))
    checks: dict[str, dict] = {}
    pi, nopi, rnd = runs.get("pretrained_pi", {}), runs.get("pretrained_no_pi", {}), runs.get("random_pi", {})
    long_lengths = [n for n in pi if n > train_len]
    if pi.get(train_len) and long_lengths:
        base = pi[train_len]["f1"]
        detail = {n: {"f1_pi": pi[n]["f1"], "f1_no_pi": nopi.get(n, {}).get("f1"), "drop_from_train_length": base - pi[n]["f1"]}
                  for n in long_lengths}
        ok = all(d["drop_from_train_length"] <= 10 and (d["f1_no_pi"] is None or d["f1_pi"] > d["f1_no_pi"]) for d in detail.values())
        checks["padding_insertion"] = {"passed": ok, "f1_at_train_length": base, "by_length": detail,
                                       **_not_learned(base, train_len)}
    cos = last(curves["distill"], "eval_cosine")
    if cos is not None:
        checks["distillation"] = {"passed": cos >= 0.9, "final_hidden_cosine": cos,
                                  "initial_hidden_cosine": first(curves["distill"], "eval_cosine")}
    common = sorted(set(pi) & set(rnd))
    if common:
        diffs = {n: pi[n]["f1"] - rnd[n]["f1"] for n in common}
        checks["pretraining_pays"] = {"passed": all(d > 0 for d in diffs.values()), "f1_gain_by_length": diffs,
                                      **_not_learned(pi.get(train_len, {}).get("f1"), train_len)}
    stage_times = {}
    for d in sorted(out.iterdir()) if out.exists() else []:
        done = d / "DONE.json"
        if done.exists():
            stage_times[d.name] = json.loads(done.read_text()).get("seconds")
    return {
        "settings": settings,
        "stage_seconds": stage_times,
        "final_losses": {k: last(v, "loss") for k, v in curves.items()},
        "final_eval": {k: {kk: vv for kk, vv in (v[-1].items() if v else []) if kk.startswith("eval_")}
                       for k, v in curves.items()},
        "qa_f1_by_length": runs,
        "checks": checks,
    }


def _md_table(runs: dict[str, dict[int, dict]]) -> str:
    lengths = sorted({n for by in runs.values() for n in by})
    if not lengths:
        return "_no QA evaluation found_\n"
    head = "| run | " + " | ".join(f"F1 / EM @ {n}" for n in lengths) + " |\n"
    head += "| --- | " + " | ".join("---" for _ in lengths) + " |\n"
    rows = ""
    for name, by in runs.items():
        cells = [f"{by[n]['f1']:.1f} / {by[n]['exact_match']:.1f}" if n in by else "-" for n in lengths]
        rows += f"| {QA_RUNS.get(name, name)} | " + " | ".join(cells) + " |\n"
    return head + rows


def _distill_loss(out: Path) -> str:
    try:
        return json.loads((out / "distill" / "DONE.json").read_text()).get("loss", "unknown")
    except (OSError, ValueError):
        return "unknown"


def write_report(out: Path, settings: dict, options=None) -> dict[str, Path]:
    out = Path(out)
    curves = read_curves(out)
    summary = summarize(out, settings, curves)
    paths: dict[str, Path] = {}
    loss_png = _plot_losses(out, curves)
    f1_png = _plot_f1(out, summary["qa_f1_by_length"], int(settings.get("qa_length", 512)))
    lines = ["# littlebird-ds pipeline report", ""]
    if options is not None:
        lines += [f"Corpus `{options.corpus}` (language `{options.language}`), preset `{options.preset}`, seed {options.seed}."
                  + (f" Teacher `{options.teacher}`, given (not trained here); the distill stage's loss: "
                     f"{_distill_loss(out)}." if getattr(options, "teacher", None) else ""), ""]
    lines += ["## Results the recipe must show", ""]
    names = {"padding_insertion": "Padding Insertion keeps F1 at long contexts and beats no Padding Insertion",
             "distillation": "Distillation: student hidden states close to the teacher's (cosine >= 0.9)",
             "pretraining_pays": "Pretraining pays: pretrained QA model beats random initialisation"}
    for key, title in names.items():
        c = summary["checks"].get(key)
        if c is None:
            lines.append(f"- {title}: **not measured** (stage output missing)")
        else:
            detail = {k: v for k, v in c.items() if k not in ("passed", "not_shown")}
            verdict = "not shown" if c.get("not_shown") else ("yes" if c["passed"] else "no")
            why = f" ({c['not_shown']})" if c.get("not_shown") else ""
            lines.append(f"- {title}: **{verdict}**{why} — `{json.dumps(detail, default=str)}`")
    lines += ["", "## QA F1 / EM by context length", "", _md_table(summary["qa_f1_by_length"])]
    if f1_png:
        lines += [f"![QA F1 against context length]({f1_png.name})", ""]
    lines += ["## Training", "", "| stage | final train loss | final validation metrics |", "| --- | --- | --- |"]
    for k, v in summary["final_losses"].items():
        ev = summary["final_eval"].get(k) or {}
        if v is None and not ev:  # a stage that did not run (the teacher, when one was given)
            continue
        lines.append(f"| {k} | {v if v is None else f'{v:.3f}'} | " + ", ".join(f"{kk}={vv:.4g}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in ev.items()) + " |")
    if loss_png:
        lines += ["", f"![loss curves]({loss_png.name})"]
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in summary["stage_seconds"].items()]
    md = out / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    js = out / "report.json"
    atomic_write_json(js, summary, indent=2, default=str)
    paths.update(report_md=md, report_json=js)
    if loss_png:
        paths["losses_png"] = loss_png
    if f1_png:
        paths["qa_f1_png"] = f1_png
    return paths
