"""The pipeline's report: ``OUT/report.md``, ``OUT/report.json`` and PNG plots.

Reads what the stages wrote (``metrics.jsonl`` of every training stage, the evaluation JSON of
every QA run, with 95% bootstrap intervals on every EM and F1) and checks what the recipe must
show (the spec owner's targets for the main job):

1. The product learned the task: the QA model's test F1 at the training length reaches
   ``TARGET_F1``.
2. Long contexts: its F1 at every longer test length stays within ``MAX_LONG_DROP`` points of
   its F1 at the training length.
3. Distillation works: the student's hidden states move towards the teacher's (held-out
   cosine, logged by the distill stage as ``eval_cosine``, ends above where it started).
4. With ``--ablations``: Padding Insertion beats the same run without it at every longer
   length, and pretraining beats random initialisation by ``MIN_PRETRAINING_GAIN`` F1 at the
   training length, each **with the 95% intervals separated**.

Comparisons between QA models mean nothing while the product is near chance (every run is
then within 10 points of every other), so 2 and 4 count as shown only when the product
reaches ``MIN_LEARNED_F1`` at the training length; below that the report says "not shown".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .utils.io import atomic_write_json, atomic_write_text

TRAINING_STAGES = ("teacher", "distill", "further")
#: F1 at the training length below which a QA comparison is not evidence (near chance).
MIN_LEARNED_F1 = 10.0
#: The product's target test F1 at the training length (tiny preset, 20 minutes).
TARGET_F1 = 25.0
#: The most F1 the product may lose from the training length to a longer test length.
MAX_LONG_DROP = 10.0
#: F1 by which the pretrained QA model must beat random initialisation at the training length.
MIN_PRETRAINING_GAIN = 5.0
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
            f1 = [m["f1"] for m in by.values()]
            lo_hi = [ci95(m) for m in by.values()]
            err = [[f - c[0] for f, c in zip(f1, lo_hi)], [c[1] - f for f, c in zip(f1, lo_hi)]]
            ax.errorbar(list(by), f1, yerr=err, fmt="o-", capsize=3, label=QA_RUNS.get(name, name))
    ax.axvline(train_length, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("F1")
    ax.set_title(f"QA test F1 (95% CI) against context length (trained at <= {train_length} tokens)", fontsize=9)
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


def ci95(row: dict) -> list[float]:
    """A result row's 95% F1 interval (``[f1, f1]`` for results written without one)."""
    ci = row.get("f1_ci95")
    return [float(ci[0]), float(ci[1])] if ci else [float(row["f1"])] * 2


def separated_above(a: dict, b: dict) -> bool:
    """``a``'s F1 interval lies wholly above ``b``'s: the difference is not resampling noise."""
    return ci95(a)[0] > ci95(b)[1]


def _ablation_missing() -> dict:
    return {"passed": False, "not_measured": "needs the comparison runs: rerun the same command with --ablations "
                                             "(finished stages are kept)"}


def summarize(out: Path, settings: dict, curves: dict[str, list[dict]] | None = None) -> dict:
    """Everything the report states, as one JSON-able dict."""
    curves = read_curves(out) if curves is None else curves
    runs: dict[str, dict[int, dict]] = {}
    for run in QA_RUNS:
        p = out / "evaluate" / f"{run}.json"
        if p.exists():
            runs[run] = f1_by_length(json.loads(p.read_text()))

    def last(rows, key):
        vals = [r[key] for r in rows if key in r]
        return vals[-1] if vals else None

    def first(rows, key):
        vals = [r[key] for r in rows if key in r]
        return vals[0] if vals else None

    train_len = int(settings.get("qa_length", 512))
    checks: dict[str, dict] = {}
    pi, nopi, rnd = runs.get("pretrained_pi", {}), runs.get("pretrained_no_pi"), runs.get("random_pi")
    base = pi.get(train_len)
    base_f1 = None if base is None else base["f1"]
    if base is not None:
        checks["qa_learned"] = {"passed": base_f1 >= TARGET_F1, "target_f1": TARGET_F1, "f1": base_f1,
                                "f1_ci95": ci95(base), "exact_match": base.get("exact_match"), "total": base.get("total")}
    long_lengths = [n for n in pi if n > train_len]
    if base is not None and long_lengths:
        detail = {n: {"f1": pi[n]["f1"], "f1_ci95": ci95(pi[n]), "drop_from_train_length": base_f1 - pi[n]["f1"]}
                  for n in long_lengths}
        checks["long_contexts"] = {"passed": all(d["drop_from_train_length"] <= MAX_LONG_DROP for d in detail.values()),
                                   "f1_at_train_length": base_f1, "max_drop": MAX_LONG_DROP, "by_length": detail,
                                   **_not_learned(base_f1, train_len)}
        if nopi is None:
            checks["padding_insertion"] = _ablation_missing()
        else:
            detail = {n: {"f1_pi": pi[n]["f1"], "f1_pi_ci95": ci95(pi[n]),
                          "f1_no_pi": nopi[n]["f1"] if n in nopi else None,
                          "f1_no_pi_ci95": ci95(nopi[n]) if n in nopi else None,
                          "separated": n in nopi and separated_above(pi[n], nopi[n])} for n in long_lengths}
            checks["padding_insertion"] = {"passed": all(d["separated"] for d in detail.values()), "by_length": detail,
                                           **_not_learned(base_f1, train_len)}
    cos = last(curves["distill"], "eval_cosine")
    if cos is not None:
        start = first(curves["distill"], "eval_cosine")
        checks["distillation"] = {"passed": start is not None and cos > start, "initial_hidden_cosine": start,
                                  "final_hidden_cosine": cos, "reaches_0.9": cos >= 0.9}
    if base is not None:
        if rnd is None:
            checks["pretraining_pays"] = _ablation_missing()
        elif train_len in rnd:
            gain = base_f1 - rnd[train_len]["f1"]
            checks["pretraining_pays"] = {
                "passed": gain >= MIN_PRETRAINING_GAIN and separated_above(base, rnd[train_len]),
                "f1_gain_at_train_length": gain, "min_gain": MIN_PRETRAINING_GAIN, "f1_random_init": rnd[train_len]["f1"],
                "f1_random_init_ci95": ci95(rnd[train_len]),
                "f1_gain_by_length": {n: pi[n]["f1"] - rnd[n]["f1"] for n in sorted(set(pi) & set(rnd))},
                **_not_learned(base_f1, train_len)}
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
    head = "| run | " + " | ".join(f"F1 [95% CI] / EM @ {n}" for n in lengths) + " |\n"
    head += "| --- | " + " | ".join("---" for _ in lengths) + " |\n"
    rows = ""
    for name, by in runs.items():
        cells = []
        for n in lengths:
            if n not in by:
                cells.append("-")
                continue
            lo, hi = ci95(by[n])
            cells.append(f"{by[n]['f1']:.1f} [{lo:.1f}, {hi:.1f}] / {by[n]['exact_match']:.1f}")
        rows += f"| {QA_RUNS.get(name, name)} | " + " | ".join(cells) + " |\n"
    total = {by[n].get("total") for by in runs.values() for n in by}
    note = f"\n{'/'.join(str(t) for t in sorted(x for x in total if x is not None))} test questions per length; " \
           "intervals: percentile bootstrap over questions.\n"
    return head + rows + note


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
    names = {"qa_learned": f"The QA model learned the task: test F1 >= {TARGET_F1:g} at the training length",
             "long_contexts": f"Long contexts: F1 at every longer test length within {MAX_LONG_DROP:g} points of the "
                              "training length's",
             "distillation": "Distillation raises the student's hidden-state cosine to the teacher",
             "padding_insertion": "Padding Insertion beats no Padding Insertion at every longer length (95% intervals "
                                  "separated)",
             "pretraining_pays": f"Pretraining pays: >= {MIN_PRETRAINING_GAIN:g} F1 over random initialisation at the "
                                 "training length (95% intervals separated)"}
    for key, title in names.items():
        c = summary["checks"].get(key)
        if c is None:
            lines.append(f"- {title}: **not measured** (stage output missing)")
        elif c.get("not_measured"):
            lines.append(f"- {title}: **not measured** ({c['not_measured']})")
        else:
            detail = {k: v for k, v in c.items() if k not in ("passed", "not_shown")}
            verdict = "not shown" if c.get("not_shown") else ("yes" if c["passed"] else "no")
            why = f" ({c['not_shown']})" if c.get("not_shown") else ""
            lines.append(f"- {title}: **{verdict}**{why} — `{json.dumps(detail, default=str)}`")
    lines += ["", "## QA test F1 / EM by context length", "", _md_table(summary["qa_f1_by_length"])]
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
