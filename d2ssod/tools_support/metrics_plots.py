"""Plotting a training run's metrics.json (``tools/plot_metrics.py``, whose docstring lists the
plots; ``tools/compare.py`` plots the method's run with it)."""
import json
import math
import os
import re

AP_KEYS = re.compile(r"^((teacher|student)/)?bbox/AP(50)?$")
PSEUDO_QUALITY = ("pseudo/precision", "pseudo/recall")
# (file stem, title, y label, does the key belong to it)
PLOTS = (
    ("ap", "COCO box AP", "AP", lambda k: bool(AP_KEYS.match(k))),
    ("unsup_losses", "unsupervised losses", "loss",
     lambda k: k.startswith("unsup/") and k.rsplit("/", 1)[-1].startswith("loss")),
    ("pseudo_boxes", "pseudo-labels per unlabeled image", "boxes per image",
     lambda k: k.startswith("pseudo/") and k not in PSEUDO_QUALITY),
    ("pseudo_quality", "pseudo-label quality (IoU 0.5, hidden ground truth)", "fraction",
     lambda k: k in PSEUDO_QUALITY),
)


def read_metrics(path):
    """``{key: [(iteration, value)]}`` from a Detectron2 metrics.json (one JSON object per
    line). A line that does not parse (the run was writing it) is skipped. Evaluation results
    are logged at the last finished iteration ``i`` (after ``i + 1`` iterations), except the
    final evaluation, logged after the loop at the number of iterations itself: AP points are
    placed at the number of iterations trained."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: pass a run's OUTPUT_DIR or its "
                                f"metrics.json.")
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "iteration" in rec:
                records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no metrics lines (Detectron2 JSONWriter format).")
    last_step = max((r["iteration"] for r in records if "total_loss" in r), default=-1)
    series = {}
    for rec in records:
        it = rec["iteration"]
        for key, value in rec.items():
            if key == "iteration" or not isinstance(value, (int, float)):
                continue
            x = it + 1 if AP_KEYS.match(key) and it <= last_step else it
            series.setdefault(key, []).append((x, float(value)))
    return series


def plot_metrics(path, out_dir=None):
    """Write the PNGs for the run at ``path`` (folder or metrics.json) into ``out_dir``
    (default ``<run>/plots``). Returns ``{png path: [series plotted]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(path)
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for stem, title, ylabel, belongs in PLOTS:
        keys = sorted(k for k in series if belongs(k))
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(x, y) for x, y in series[key] if math.isfinite(y)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key,
                    marker="o" if len(pts) <= 20 else None,
                    linestyle="--" if key.endswith("AP50") else "-")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = os.path.join(out_dir, f"{stem}.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written[png] = keys
    return written
