"""What else the black box's answers can buy: other ways to read the same answers, replayed over zoos.

The previous default vote read one thing from each answer on a purified pass, its label, and two from the answer on
the original, its label and the probability of it (the gate and the ballots). The readings below take more of the
same answers, on the passes the default's rounds ran (`Cascade.run`, the code path of `sanitize`; the rounds do not
depend on the reading), so they cost the same NFE and no extra query but for `shifted`:

- `votes`: the previous default (`pick: votes`): the class with the most votes.
- `probability`: the default (`pick: probability`): where the passes out-vote the original label, the class they
  voted to which they give the most probability summed over them. It must match the zoo's row of the default.
- `residual-a`: where they out-vote it, every class but the original's by the passes' summed probability times the
  original answer's own probability for it, renormalised without its top class, to the power a: a triggered
  image's answer, its target set aside, may still rank the garment's class first.
- `product-a`: where the gate is open, argmax of log(passes' mean probability) + a log(original probability).
- `shifted`: the default's rounds again, the black box asked about each image and its four one-pixel shifts, their
  probabilities averaged (five times the queries; test-time augmentation).

Also the passes' ceiling: PA of a plain majority of all five passes against what the CA and PA goals together ask
(PA >= CA undefended - 5 points), which no decision rule over these passes can beat on triggered images.

    python jobs/vote_rules.py --memo /tmp/run3/memo.pkl --zoo models/zoo --zoo models/zoo-redraw \
        --zoo models/zoo-draw3 --zoo models/victims

Reports the worst victim and median per rule, for the first zoo (where the default was chosen) and the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.attacks import TARGET, apply_trigger
from pipeline.bench import GRID
from pipeline.blackbox.base import Prediction
from pipeline.evaluate import calibrate_vote, eval_images, victim_classifier
from pipeline.purify import Cascade, build_purifier, load_model
from pipeline.purify.cascade import escalation_seeds, majority
from pipeline.zoo import DEFAULT_LABEL, load_memo, load_zoo, memo_meta, memoised, save_memo, spread, victim_row

PREVIOUS = "vote-guided4-k5-q30-v3-restart-sharp1-tau6-support3"  # the default with pick: votes

BATCH = 256
MEASURES = ("ca_drop", "asr_over_floor", "pa_gap")


def shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 (N, C, H, W) moved by (dy, dx) pixels, the uncovered border black (the domain's background)."""
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def shifted(classify: Callable[[np.ndarray], Prediction]) -> Callable[[np.ndarray], Prediction]:
    """The black box asked about each image and its four one-pixel shifts, the probabilities averaged."""
    def ask(x: np.ndarray) -> Prediction:
        views = [x] + [shift(x, dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
        scores = np.mean([np.asarray(classify(v).scores, np.float32) for v in views], 0)
        return Prediction(scores.argmax(1), scores, [None] * len(x))
    return ask


def rounds(cascade: Cascade, images: np.ndarray, keys: list[str],
           classify: Callable[[np.ndarray], Prediction]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shipped rounds in batches: (labels, votes (N, k), nfe)."""
    out = [cascade.run(images[s:s + BATCH], keys[s:s + BATCH], 0, classify) for s in range(0, len(images), BATCH)]
    return (np.concatenate([o.labels for o in out]), np.concatenate([o.votes for o in out]),
            np.concatenate([o.nfe for o in out]))


def pickers(labels: np.ndarray, ran: np.ndarray, orig: np.ndarray, passes: np.ndarray, below: float) -> dict:
    """Labels of each alternative reading of the previous default's vote (`labels`), on the passes the rounds ran
    (`ran`, (N, k) bool)."""
    n = len(labels)
    pred = orig.argmax(1)
    mean = (passes * ran[..., None]).sum(1) / ran.sum(1, keepdims=True)
    over = labels != pred
    others = np.log(mean + 1e-6)
    others[np.arange(n), pred] = -np.inf
    resid = orig.copy()
    resid[np.arange(n), pred] = 0
    resid = np.log(resid / np.maximum(resid.sum(1, keepdims=True), 1e-12) + 1e-6)
    gate = orig.max(1) < below
    out = {}
    for a in (0.2, 0.3):
        out[f"residual-{a}"] = np.where(over, (others + a * resid).argmax(1), labels)
    for a in (0.5, 1.0):
        out[f"product-{a}"] = np.where(gate, (np.log(mean + 1e-6) + a * np.log(orig + 1e-6)).argmax(1), labels)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, action="append", required=True, help="zoo folder (repeatable; the first "
                    "is reported apart from the rest)")
    ap.add_argument("--memo", type=Path, required=True, help="the zoo's memo (python -m pipeline zoo --memo)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="write the per-victim rows here (JSON)")
    args = ap.parse_args(argv)
    t0 = time.time()
    model = load_model("fmnist-tiny", "cpu")
    meta = memo_meta("fmnist-tiny", model, "float32")
    kept = load_memo(args.memo, meta)
    grid = {label: (method, params) for label, method, params in GRID}
    cascade, default = (build_purifier(grid[label][0], model, grid[label][1], dtype="float32")
                        for label in (PREVIOUS, DEFAULT_LABEL))
    cascade.base = default.base = memo = memoised(cascade.base, kept)
    seeds = [0, *escalation_seeds(0, cascade.k)]

    clean, labels = eval_images(args.n)
    keep = np.flatnonzero(labels != TARGET)
    victims = [v | {"zoo": str(z)} for z in args.zoo for v in load_zoo(z)]
    sets = {"clean": (clean, [f"clean-{i}" for i in range(args.n)])}
    for t in dict.fromkeys(v["trigger"] for v in victims):
        sets[t] = (apply_trigger(clean[keep], t), [f"{t}-{i}" for i in keep])
    passes = {}
    for name, (images, keys) in sets.items():  # every pass of every image, for the ceiling
        passes[name] = np.stack([np.concatenate([memo(images[s:s + BATCH], keys[s:s + BATCH], seed).uint8()
                                                 for s in range(0, len(images), BATCH)]) for seed in seeds], 1)
    if memo.computed:
        save_memo(args.memo, meta, kept)
    print(f"[{time.time() - t0:.0f}s] passes ready ({memo.computed} purified)", flush=True)

    rows, ceiling = [], []
    for v in victims:
        classify = victim_classifier(v["path"].stem, v["path"].parent, (clean.shape[1], clean.shape[-1]))
        trig, trig_keys = sets[v["trigger"]]
        per_set = {}
        below = calibrate_vote(cascade, classify, clean)
        calibrate_vote(default, classify, clean)
        for name, images, keys in (("clean", clean, sets["clean"][1]), ("trig", trig, trig_keys)):
            got, votes, nfe = rounds(cascade, images, keys, classify)
            picked, picked_votes, _ = rounds(default, images, keys, classify)
            assert (picked_votes == votes).all()  # the same rounds; only the reading differs
            orig = np.asarray(classify(images).scores, np.float32)
            pp = passes["clean" if name == "clean" else v["trigger"]]
            pass_probs = np.stack([np.asarray(classify(pp[:, j]).scores, np.float32) for j in range(len(seeds))], 1)
            per_set[name] = {"votes": got, "probability": picked,
                             **pickers(got, votes >= 0, orig, pass_probs, below)}, nfe, orig
            if name == "trig":
                top5 = majority(pass_probs.argmax(2))[0]
                ca_und = float((per_set["clean"][2].argmax(1) == labels).mean())
                ceiling.append({"victim": f"{Path(v['zoo']).name}/{v['name']}", "ca_undefended": ca_und,
                                "pa_passes": float((top5 == labels[keep]).mean())})
        tta = shifted(classify)
        calibrate_vote(default, tta, clean)
        for name, images, keys in (("clean", clean, sets["clean"][1]), ("trig", trig, trig_keys)):
            per_set[name][0]["shifted"] = rounds(default, images, keys, tta)[0]
        (clean_rules, clean_nfe, orig_c), (trig_rules, trig_nfe, orig_t) = per_set["clean"], per_set["trig"]
        for rule in clean_rules:
            row = victim_row(v, rule, clean_rules[rule], orig_c.argmax(1), orig_c.max(1), labels, trig_rules[rule],
                             labels[keep], np.concatenate([clean_nfe, trig_nfe]), orig_t.argmax(1))
            row["victim"] = f"{Path(v['zoo']).name}/{v['name']}"
            row["first_zoo"] = v["zoo"] == str(args.zoo[0])
            rows.append(row)
        print(f"[{time.time() - t0:.0f}s] {v['zoo']}/{v['name']}", flush=True)

    print("\n| reading | victims | CA drop: worst / median | ASR - floor | CA - PA | every goal |")
    print("|---|---|---|---|---|---|")
    for first in (True, False):
        sub = [r for r in rows if r["first_zoo"] == first]
        where = args.zoo[0].name if first else "the rest"
        for s in spread(sub):
            cells = [f"{100 * s[k]['worst']:.1f}±{100 * s[k]['worst_se']:.1f} ({s[k]['worst_victim']}) / "
                     f"{100 * s[k]['median']:.1f}" for k in MEASURES]
            print(f"| {s['label']} | {where} ({s['victims']}) | " + " | ".join(cells)
                  + f" | {s['meet_all']} / {s['victims']} |")
    short = [c for c in ceiling if c["pa_passes"] < c["ca_undefended"] - 0.05]
    print(f"\nthe five passes' majority gives PA < CA undefended - 5 points on {len(short)} of {len(ceiling)} "
          f"victims; worst by {100 * max(c['ca_undefended'] - 0.05 - c['pa_passes'] for c in ceiling):.1f} points")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "ceiling": ceiling}, indent=1, default=str))
    print(f"[{time.time() - t0:.0f}s] done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
