#!/usr/bin/env python
"""How the supervised and the unsupervised losses share a semi-supervised step, at a checkpoint.

    python -m benchmarks.gradient_balance --config-file configs/demo/efficient_teacher.yaml \
        --checkpoint output/demo/efficient_teacher/model_0000399.pth [--batches 6] \
        [--json out.json] [--collect benchmarks/gradient_balance.json --label NAME] [KEY VALUE ...]

Resumes the method's trainer from ``--checkpoint`` (a checkpoint a semi-supervised run wrote,
teacher and student together, e.g. the hand-over that ``tools/demo.py`` and
``benchmarks/benchmark_methods.py`` start a method from), then, on ``--batches`` labeled + unlabeled
batches of its data loaders, takes the gradient of the student's parameters for every loss term
the step would sum (the supervised terms, and the unsupervised ones with ``λ_u`` and the
method's term weights applied) and prints per batch and on average:

* ``|g_sup|``, ``|g_unsup|``: norms of the summed supervised / unsupervised gradients, and the
  norm of each term's gradient;
* ``cos``: the cosine between the two;
* ``sup share``: the component of the step's direction (g_sup + g_unsup) / |g_sup + g_unsup|
  along g_sup / |g_sup|, i.e. how far one unit step moves the supervised objective compared
  with a purely supervised step. It matters whenever the step length is fixed rather than the
  gradient's, as with gradient clipping that is active at every step (the demo configs clip
  each parameter's gradient to norm 1, and their gradients are above that): then λ_u does not
  add an unsupervised step, it takes a share of the supervised one;
* ``sup progress``: the first-order decrease of the supervised loss in one SGD step on the
  summed gradient, relative to a step on the supervised gradient alone, both clipped as the
  config's ``SOLVER.CLIP_GRADIENTS`` clips (Detectron2's ``norm`` type: each parameter's
  gradient to ``CLIP_VALUE``; ``full_model``: the whole gradient; off: not at all):
  g_sup · clip(g_sup + g_unsup) / g_sup · clip(g_sup), momentum aside. Without clipping it is
  1 + g_sup · g_unsup / |g_sup|²;
* ``λ_u for equal norms``: the ``SSOD.UNSUP_WEIGHT`` at which |g_unsup| would equal |g_sup|;
* with ``--target-progress P``: the largest ``λ_u`` at which the mean sup progress is still ≥ P
  (the unsupervised gradient scales with λ_u, so every weight is evaluated on the same batches'
  gradients, clipping included).

``--collect FILE`` adds the mean as a row of a collection (``{"what", "rows", "note"}``, the
file the README's table is rendered from by ``benchmarks/results_table.py``), replacing a row of the
same ``--label`` and ``λ_u``; the label (default: the config's name) names the row in the table.

Nothing is trained and no file is written besides ``--json`` and ``--collect``. Single process;
the same code on CPU and CUDA (``MODEL.DEVICE``).
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_grads(loss, params, retain):
    """One vector of ``d loss / d params`` (zeros where a parameter does not take part)."""
    import torch

    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def term_gradients(losses, params):
    """{term: flat gradient} of every term of ``losses`` that depends on ``params`` (a term
    without a graph, e.g. a constant 0, is left out)."""
    terms = [(k, v) for k, v in losses.items() if v.requires_grad]
    return {k: flat_grads(v, params, retain=True) for k, v in terms}


def clipper(clip_cfg, sizes):
    """A function that clips a flat gradient (parameters of ``sizes`` one after another) as
    Detectron2's optimizer wrapper does for ``SOLVER.CLIP_GRADIENTS`` ``clip_cfg``."""
    import torch

    if not clip_cfg.ENABLED:
        return lambda g: g
    limit, norm_type = clip_cfg.CLIP_VALUE, clip_cfg.NORM_TYPE

    def scaled(g):  # torch.nn.utils.clip_grad_norm_'s rule on one group
        return g * (limit / (torch.linalg.vector_norm(g, norm_type) + 1e-6)).clamp(max=1.0)
    if clip_cfg.CLIP_TYPE == "value":
        return lambda g: g.clamp(-limit, limit)
    if clip_cfg.CLIP_TYPE == "full_model":
        return scaled
    return lambda g: torch.cat([scaled(part) for part in g.split(sizes)])


def balance(sup, unsup, clip=lambda g: g):
    """The row of one batch from the summed gradients ``sup`` and ``unsup`` (flat tensors) and
    the optimizer's gradient clipping ``clip`` (:func:`clipper`)."""
    total = sup + unsup
    ns, nu, nt = sup.norm().item(), unsup.norm().item(), total.norm().item()
    cos = (sup @ unsup).item() / (ns * nu) if ns and nu else float("nan")
    share = (total @ sup).item() / (nt * ns) if nt and ns else float("nan")
    alone = (sup @ clip(sup)).item()
    progress = (sup @ clip(total)).item() / alone if alone else float("nan")
    return {"sup_norm": ns, "unsup_norm": nu, "cos": cos, "total_norm": nt, "sup_share": share,
            "sup_progress": progress}


def progress_at(pairs, clip, scale):
    """Mean sup progress over the batches' ``(g_sup, g_unsup)`` ``pairs`` with the unsupervised
    gradients multiplied by ``scale``."""
    return statistics.mean(balance(sup, scale * unsup, clip)["sup_progress"]
                           for sup, unsup in pairs)


def weight_for_progress(pairs, clip, unsup_weight, target, steps=40):
    """The λ_u at which the mean sup progress first falls below ``target`` as λ_u grows
    (``unsup_weight`` is the weight ``pairs`` were taken at): a scan of 61 weights from
    ``unsup_weight``/1000 to ×1000 (ten per factor of 10), then ``steps`` bisections between the
    last scanned weight that keeps it and the first that does not (from 0 when even the smallest
    does not); the largest scanned weight if none falls below."""
    grid = [unsup_weight * 10 ** (k / 10 - 3) for k in range(61)]
    ok = 0.0
    for w in grid:
        if progress_at(pairs, clip, w / unsup_weight) < target:
            lo, hi = ok, w
            break
        ok = w
    else:
        return ok
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if progress_at(pairs, clip, mid / unsup_weight) >= target else (lo, mid)
    return lo


def measure(trainer, batches):
    """For ``batches`` labeled + unlabeled batches of a resumed
    :class:`~d2ssod.engine.SSODTrainer`: the rows of :func:`balance` (plus per-term norms), each
    batch's summed ``(g_sup, g_unsup)`` (on the model's device) and the config's clipping as a
    function (:func:`clipper`)."""
    import torch
    from detectron2.utils.events import EventStorage

    inner = trainer._trainer
    params = [p for p in inner.model.parameters() if p.requires_grad]
    clip = clipper(trainer.cfg.SOLVER.CLIP_GRADIENTS, [p.numel() for p in params])
    rows, pairs = [], []
    with EventStorage(trainer.start_iter) as storage:
        for k in range(batches):
            storage.iter = inner.iter = trainer.start_iter + k
            labeled, unlabeled = inner.next_labeled(), inner.next_unlabeled()
            sup = term_gradients(inner.method.supervised_losses(inner.model, labeled, None),
                                 params)
            unsup = term_gradients(inner.method.unsupervised_losses(inner.model, unlabeled),
                                   params)
            zero = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
            g_sup, g_unsup = sum(sup.values(), zero), sum(unsup.values(), zero)
            row = balance(g_sup, g_unsup, clip)
            row["terms"] = {k: v.norm().item() for k, v in {**sup, **unsup}.items()}
            rows.append(row)
            pairs.append((g_sup, g_unsup))
    return rows, pairs, clip


def summary(rows, unsup_weight):
    """Means over the batches, and the λ_u at which the mean norms would be equal."""
    keys = ("sup_norm", "unsup_norm", "cos", "total_norm", "sup_share", "sup_progress")
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys}
    terms = {t: statistics.mean(r["terms"].get(t, 0.0) for r in rows) for t in rows[0]["terms"]}
    mean["terms"] = terms
    mean["unsup_weight"] = unsup_weight
    mean["unsup_weight_for_equal_norms"] = (unsup_weight * mean["sup_norm"] / mean["unsup_norm"]
                                            if mean["unsup_norm"] else float("nan"))
    return mean


def markdown(data):
    """The Markdown table of a collection of this tool's results: ``data["rows"]``, each
    ``{"config", "opts", "iteration", "mean"}`` (``mean`` as :func:`summary` returns it), and
    ``data["note"]``, the text under the table (``benchmarks/gradient_balance.json``)."""
    lines = ["| method (config) | λ_u | iteration | \\|g_sup\\| | \\|g_unsup\\| | cos | "
             "sup progress of a clipped step | λ_u for equal norms | "
             "λ_u for sup progress ≥ P |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        m = r["mean"]
        name = row_name(r)
        lines.append(f"| {name} | {m['unsup_weight']:g} | {r['iteration']} | "
                     f"{m['sup_norm']:.2f} | {m['unsup_norm']:.2f} | {m['cos']:+.2f} | "
                     f"{m['sup_progress']:.2f} | {m['unsup_weight_for_equal_norms']:.2f} | "
                     + (f"{m['unsup_weight_for_target_progress']:.3f} "
                        f"(P {m['target_progress']:g}) |"
                        if "target_progress" in m else "— |"))
    return "\n".join(lines + ["", data["note"]])


def config_name(config_file):
    return os.path.splitext(os.path.basename(config_file))[0]


def row_name(row):
    """A collection row's name: its ``label``, or its config's name for rows written before
    ``--label`` existed."""
    return row.get("label") or config_name(row["config"])


def collect(path, row):
    """Put ``row`` (``{"label", "config", "checkpoint", "opts", "iteration", "mean"}``) into the
    collection file ``path`` (created if missing), replacing a row with the same label and
    ``λ_u``; returns the collection."""
    data = {"what": "benchmarks/gradient_balance.py results", "rows": [], "note": ""}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)

    def key(r):
        return row_name(r), r["mean"]["unsup_weight"]

    rows = [r for r in data["rows"] if key(r) != key(row)]
    data["rows"] = rows + [row]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file
    return data


def build_trainer(config_file, checkpoint, opts):
    """An :class:`~d2ssod.engine.SSODTrainer` resumed from a copy of ``checkpoint`` in a
    temporary output folder (the run's own folder is left as it is)."""
    from detectron2.utils.env import seed_all_rng

    from d2ssod.engine import SSODTrainer, build_cfg

    if not os.path.isfile(checkpoint):
        raise SystemExit(f"--checkpoint {checkpoint}: no such file (a .pth written by a "
                         f"semi-supervised run, e.g. its hand-over model_<burn-in − 1>.pth).")
    out = tempfile.mkdtemp(prefix="gradient_balance_")
    shutil.copy(checkpoint, out)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write(os.path.basename(checkpoint))
    cfg = build_cfg(config_file, ["OUTPUT_DIR", out, *opts])
    if cfg.SSOD.METHOD == "supervised":
        raise SystemExit(f"{config_file}: SSOD.METHOD is 'supervised'; give a method's config "
                         f"(the unsupervised terms are the method's).")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # same SEED: same batches, augmentations
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=True)
    return trainer, cfg, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--json", default="", help="write every batch's numbers and the mean here")
    parser.add_argument("--collect", default="",
                        help="add the mean as a row of this collection (e.g. "
                             "benchmarks/gradient_balance.json)")
    parser.add_argument("--label", default="", help="the row's name (default: the config's)")
    parser.add_argument("--target-progress", type=float, default=None,
                        help="also find the largest λ_u whose mean sup progress is >= this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)

    trainer, cfg, out = build_trainer(args.config_file, args.checkpoint,
                                      ["DATALOADER.NUM_WORKERS", 0, *args.opts])
    try:
        rows, pairs, clip = measure(trainer, args.batches)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    mean = summary(rows, cfg.SSOD.UNSUP_WEIGHT)
    if args.target_progress is not None:
        mean["target_progress"] = args.target_progress
        mean["unsup_weight_for_target_progress"] = weight_for_progress(
            pairs, clip, cfg.SSOD.UNSUP_WEIGHT, args.target_progress)
    for i, r in enumerate(rows):
        print(f"batch {i}: |g_sup| {r['sup_norm']:.3f}  |g_unsup| {r['unsup_norm']:.3f}  "
              f"cos {r['cos']:+.3f}  |g_sup + g_unsup| {r['total_norm']:.3f}  "
              f"sup share {r['sup_share']:.3f}  sup progress {r['sup_progress']:.3f}")
    print("terms (mean gradient norm): " + ", ".join(
        f"{k} {v:.3f}" for k, v in mean["terms"].items()))
    print(f"mean over {len(rows)} batches at iteration {trainer.start_iter}: |g_sup| "
          f"{mean['sup_norm']:.3f}, |g_unsup| {mean['unsup_norm']:.3f} (λ_u "
          f"{mean['unsup_weight']:g}), cos {mean['cos']:+.3f}, sup share "
          f"{mean['sup_share']:.3f}, sup progress {mean['sup_progress']:.3f}; λ_u for equal norms "
          f"{mean['unsup_weight_for_equal_norms']:.3f}")
    if args.target_progress is not None:
        print(f"largest λ_u with sup progress >= {args.target_progress:g}: "
              f"{mean['unsup_weight_for_target_progress']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config_file": args.config_file, "checkpoint": args.checkpoint,
                       "opts": args.opts, "iteration": trainer.start_iter, "batches": rows,
                       "mean": mean}, f,
                      indent=1)
    if args.collect:
        collect(args.collect, {"label": args.label or config_name(args.config_file),
                               "config": os.path.relpath(os.path.abspath(args.config_file), REPO),
                               "checkpoint": args.checkpoint, "opts": " ".join(args.opts),
                               "iteration": trainer.start_iter, "mean": mean})
    return mean


if __name__ == "__main__":
    main()
