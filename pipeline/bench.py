"""Efficacy and cost of every method, side by side: CA / PA / ASR / floor, flag precision/recall, NFE, img/s and
peak memory per attack; a Markdown table, a JSON file and Pareto plots (ASR and CA against NFE).

    python -m pipeline bench [--n 300] [--attacks badnets,blended,wanet,sig] [--only sdedit,cascade] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.datasets import DATASETS
from pipeline.evaluate import evaluate, format_rows
from pipeline.purify import build_purifier, load_model
from pipeline.purify.models import pick_device

GUIDED6: dict[str, Any] = {"base": "guided", "steps": 6, "restart_tau": None, "tau": 0.4, "sharpen": 0.5,
                           "original_votes": 2, "original_support": 0.0, "pick": "votes"}
GUIDED4: dict[str, Any] = {**GUIDED6, "steps": 4}

# (label, method, params). The first rows are the baselines as published; the last ones are ours.
GRID: list[tuple[str, str, dict[str, Any]]] = [
    ("none", "none", {}),
    ("sdedit-200", "sdedit", {"t_start": 200, "steps": 10}),
    ("sdedit-250", "sdedit", {"t_start": 250, "steps": 10}),
    ("sdedit-300", "sdedit", {"t_start": 300, "steps": 10}),
    ("sdedit-400", "sdedit", {"t_start": 400, "steps": 8}),
    ("sdedit-300-e1-sharp", "sdedit", {"t_start": 300, "steps": 8, "eta": 1.0, "sharpen": 0.5}),
    ("zip-pool2", "zip", {"degradation": "pool2", "t_start": 400, "steps": 20}),
    ("zip-pool4", "zip", {"degradation": "pool4", "t_start": 400, "steps": 20}),
    ("zip-blur2", "zip", {"degradation": "blur2", "t_start": 400, "steps": 20}),
    ("sampdetox-paper", "sampdetox", {"t1": 20, "t2": 120}),
    ("sampdetox-ddim", "sampdetox", {"t1": 60, "t2": 250, "steps1": 6, "steps2": 12}),
    ("repair", "repair", {}),
    ("guided", "guided", {}),  # with the embedded model's black level (a veiled input's haze cleared first)
    ("guided-no-unveil", "guided", {"black_level": 0.0}),
    ("guided-restart", "guided", {"restart_tau": 0.8}),  # restarts where its locator removed something (a patch)
    # The published flip cascade and our earlier votes: the original label casts no ballot.
    ("cascade-250-k3", "cascade", {"base": "sdedit", "t_start": 250, "steps": 10, "eta": 0.0, "k": 3,
                                   "escalate": "flip", "original_votes": 0, "pick": "votes"}),
    ("cascade-250-k5", "cascade", {"base": "sdedit", "t_start": 250, "steps": 10, "eta": 0.0, "k": 5,
                                   "escalate": "flip", "original_votes": 0, "pick": "votes"}),
    ("repair-cascade-k3", "cascade", {"base": "repair", "k": 3, "escalate": "flip", "original_votes": 0,
                                      "pick": "votes"}),
    ("vote-300-k5-s8", "cascade", {"base": "sdedit", "t_start": 300, "steps": 8, "eta": 1.0, "k": 5,
                                   "escalate": "always", "original_votes": 0, "pick": "votes"}),
    ("vote-300-k5-s8-sharp", "cascade", {"base": "sdedit", "t_start": 300, "steps": 8, "eta": 1.0, "sharpen": 0.5,
                                         "k": 5, "escalate": "always", "original_votes": 0, "pick": "votes"}),
    # Votes over `guided` passes. Pinned here since the cascade's own defaults for a guided base moved on
    # (GUIDED_BASE): 6 guided steps, no restart, trusting blocks up to 0.4, sharpened at 0.5, 2 ballots unless a row
    # says otherwise, ballots that do not ask for the passes' support.
    ("vote-guided-k5", "cascade", {**GUIDED6, "k": 5, "escalate": "always", "original_votes": 0,
                                   "black_level": 0.0}),
    # The same vote, the original label casting 2 ballots where the victim gave it < .95.
    ("vote-guided-k5-gate", "cascade", {**GUIDED6, "k": 5, "escalate": "always", "original_below": 0.95,
                                        "black_level": 0.0}),
    # The previous default: that, unveiling with guided's domain black level.
    ("vote-guided-k5-gate-unveil", "cascade", {**GUIDED6, "k": 5, "escalate": "always", "original_below": 0.95}),
    # That, each pass restarting where its locator removed something (BadNets ASR down, CA down a little).
    ("vote-guided-k5-gate-unveil-restart", "cascade", {**GUIDED6, "k": 5, "escalate": "always",
                                                       "original_below": 0.95, "restart_tau": 0.8}),
    # Cheaper passes, more of them: 4 DDIM steps after the locator (6 NFE a pass; ~19 mean NFE at k 5, ~26 at k 7).
    ("vote-guided4-k5-gate-unveil", "cascade", {**GUIDED4, "k": 5, "escalate": "always", "original_below": 0.95}),
    ("vote-guided4-k7-gate-unveil", "cascade", {**GUIDED4, "k": 7, "escalate": "always", "original_below": 0.95}),
    # The gate measured per job: open below the q-quantile of the black box's top probability on its first rows.
    ("vote-guided-k5-q25-unveil", "cascade", {**GUIDED6, "k": 5, "escalate": "always", "original_quantile": 0.25}),
    ("vote-guided-k5-q40-unveil", "cascade", {**GUIDED6, "k": 5, "escalate": "always", "original_quantile": 0.4}),
    ("vote-guided4-k5-q25-unveil", "cascade", {**GUIDED4, "k": 5, "escalate": "always", "original_quantile": 0.25}),
    ("vote-guided4-k5-q40-unveil", "cascade", {**GUIDED4, "k": 5, "escalate": "always", "original_quantile": 0.4}),
    # The previous default: that, with 3 ballots and restarts.
    ("vote-guided4-k5-q40-v3-restart", "cascade", {**GUIDED4, "restart_tau": 0.8, "k": 5, "escalate": "always",
                                                   "original_votes": 3, "original_quantile": 0.4}),
    # The previous default: that, its passes sharpened at amount 1.
    ("vote-guided4-k5-q40-v3-restart-sharp1", "cascade", {**GUIDED4, "restart_tau": 0.8, "sharpen": 1.0, "k": 5,
                                                          "escalate": "always", "original_votes": 3,
                                                          "original_quantile": 0.4}),
    # The previous default: that, its passes trusting blocks up to 0.5.
    ("vote-guided4-k5-q40-v3-restart-sharp1-tau5", "cascade", {**GUIDED4, "restart_tau": 0.8, "tau": 0.5,
                                                               "sharpen": 1.0, "k": 5, "escalate": "always",
                                                               "original_votes": 3, "original_quantile": 0.4}),
    # The previous default: that, the original's ballots counting only while the passes give its label a mean
    # probability of at least 0.3.
    ("vote-guided4-k5-q40-v3-restart-sharp1-tau5-support3", "cascade",
     {**GUIDED4, "restart_tau": 0.8, "tau": 0.5, "sharpen": 1.0, "k": 5, "escalate": "always", "original_votes": 3,
      "original_quantile": 0.4, "original_support": 0.3}),
    # The previous default: that, its passes trusting blocks up to 0.6 and the gate at the black box's 0.3-quantile.
    ("vote-guided4-k5-q30-v3-restart-sharp1-tau6-support3", "cascade",
     {**GUIDED4, "restart_tau": 0.8, "tau": 0.6, "sharpen": 1.0, "k": 5, "escalate": "always", "original_votes": 3,
      "original_quantile": 0.3, "original_support": 0.3}),
    # The default method (chosen on the worst victim of 49, docs/zoo.md): that, the class the passes voted against
    # the original label picked by the probability they give it rather than by their votes.
    ("vote-guided4-k5-q30-v3-restart-sharp1-tau6-support3-pick", "cascade",
     {**GUIDED4, "restart_tau": 0.8, "tau": 0.6, "sharpen": 1.0, "k": 5, "escalate": "always", "original_votes": 3,
      "original_quantile": 0.3, "original_support": 0.3, "pick": "probability"}),
]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({r["attack"] for r in rows})
    fig, axes = plt.subplots(2, len(attacks), figsize=(4.2 * len(attacks), 7.5), squeeze=False)
    for j, attack in enumerate(attacks):
        sub = [r for r in rows if r["attack"] == attack]
        for i, metric in enumerate(("asr", "ca")):
            ax = axes[i][j]
            for r in sub:
                ax.scatter(r["nfe"], r[metric], s=18)
                ax.annotate(r["label"], (r["nfe"], r[metric]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
            if metric == "asr":
                floor = min((r["floor"] for r in sub if not math.isnan(r["floor"])), default=float("nan"))
                ax.axhline(floor, ls=":", c="gray", lw=0.8, label="lowest floor")
                ax.legend(fontsize=6)
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlabel("NFE per image")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"{attack}: {metric.upper()} vs NFE", fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


UPDATE_KEYS = ("model", "data", "n", "seed", "dtype")


def previous_rows(args: argparse.Namespace, attacks: list[str], device: str) -> tuple[list[dict], list[dict]]:
    """The rows and runs of `--out`/results.json for `--update`; refuses results made with other settings, since a
    table mixing them would compare unlike numbers."""
    path = args.out / "results.json"
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    meta = old["meta"]
    differ = [k for k in UPDATE_KEYS if meta.get(k) != getattr(args, k)]
    if meta.get("device") != device:
        differ.append("device")
    if sorted({r["attack"] for r in old["rows"]}) != sorted(attacks):
        differ.append("attacks")
    if differ:
        raise SystemExit(f"--update: {path} was made with other {', '.join(differ)}; rerun the grid without --update")
    runs = meta.get("runs") or [{"labels": sorted({r["label"] for r in old["rows"]}), "seconds": meta["seconds"]}]
    return old["rows"], runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=300, help="test images per attack (clean and triggered each)")
    ap.add_argument("--attacks", default="badnets,blended,wanet,sig")
    ap.add_argument("--data", default="fmnist", choices=DATASETS, help="test images (cifar10: hub or CIFAR10_DIR)")
    ap.add_argument("--victims", type=Path, default=None,
                    help="folder of <attack>.onnx victims (default: the embedded Fashion-MNIST ones)")
    ap.add_argument("--only", help="comma-separated labels or methods from the grid")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of --out/results.json that this run does not redo (same model, data, "
                         "device, n, seed, dtype and attacks, else an error): rerun a few rows without rerunning "
                         "the grid")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    model = load_model(args.model, device)
    attacks = args.attacks.split(",")
    wanted = set(args.only.split(",")) if args.only else None
    args.out.mkdir(parents=True, exist_ok=True)
    kept, runs = previous_rows(args, attacks, device) if args.update else ([], [])
    rows: list[dict] = []
    t_all = time.time()
    for label, method, params in GRID:
        if wanted and label not in wanted and method not in wanted:
            continue
        defense = build_purifier(method, model, params, dtype=args.dtype)
        t0 = time.time()
        got = evaluate(defense, attacks, n=args.n, seed=args.seed, batch_size=args.batch_size, method=method,
                       params=params, data=args.data, victims_dir=args.victims)
        for r in got:
            r["label"] = label
        rows += got
        print(f"[{time.time() - t_all:6.0f}s] {label}: {time.time() - t0:.0f}s", flush=True)
        print(format_rows(got), flush=True)
    meta = {"model": args.model, "data": args.data, "device": device, "dtype": args.dtype, "n": args.n,
            "seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "seconds": round(time.time() - t_all, 1)}
    if args.update:
        redone = {r["label"] for r in rows}
        order = {label: i for i, (label, _, _) in enumerate(GRID)}
        rows = sorted([r for r in kept if r["label"] not in redone] + rows, key=lambda r: order.get(r["label"], -1))
        meta["runs"] = [*runs, {"labels": sorted(redone), "seconds": meta["seconds"]}]
        meta["seconds"] = round(sum(r["seconds"] for r in meta["runs"]), 1)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    table = format_rows(sorted(rows, key=lambda r: (r["attack"], r["nfe"])))
    (args.out / "results.md").write_text(
        f"Model {args.model}, data {args.data}, on {device} ({meta['gpu'] or platform.processor() or 'cpu'}), "
        f"n={args.n} per attack, seed {args.seed}, {meta['seconds']}s.\n\n{table}\n")
    plot(rows, args.out / "pareto.png")
    print(f"\nwrote {args.out / 'results.md'}, results.json, pareto.png")
    return 0
