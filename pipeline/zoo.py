"""The victim-zoo benchmark: every method against every victim of a zoo (architectures, recipes and attacks the
defense was not tuned on), per victim with standard errors, and the spread across victims with the worst one first.

    python -m pipeline zoo [--zoo models/zoo] [--n 1000] [--offset 0] [--only none,sdedit-250,...] [--out docs/zoo]

Methods are the benchmark's grid labels (`pipeline.bench.GRID`). Each victim is queried as a black box (ONNX) on
`--n` clean test images from `--offset` on and on the triggered copies of those of them whose label is not the
target. Settings were chosen on the first 1,000 test images; an offset past them gives images held out from every
choice, which is how a worst victim picked on those images is measured again without the luck of its pick. The vote
runs its own rounds (`Cascade.run`, the code path of `sanitize`); purification is memoised per (image, key, seed),
which changes nothing since a purifier's output depends only on those, so victims that see the same images share it.

Goals per victim (the defense's bar on models it was not tuned on): CA within 2 points of the victim undefended,
ASR within 1 point of the floor, PA >= CA - 3 points, mean NFE <= 20.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.attacks import TARGET, apply_trigger
from pipeline.config import SinkCheckConfig
from pipeline.datasets import load_dataset
from pipeline.evaluate import calibrate_vote, eval_images, run_defense, victim_classifier
from pipeline.flows import find_sinks
from pipeline.metrics import attack_metrics
from pipeline.paths import REPO_ROOT
from pipeline.purify import Cascade, build_purifier, load_model
from pipeline.purify.models import pick_device

ZOO_DIR = REPO_ROOT / "models" / "zoo"
# The published baselines at their best CPU-affordable settings, our best single pass and the default vote.
DEFAULT_METHODS = ("none", "sdedit-250", "zip-pool2", "sampdetox-ddim", "guided", "vote-guided-k5-gate-unveil",
                   "vote-guided4-k5-q30-v3-restart-sharp1-tau6-support3-pick")
DEFAULT_LABEL = "vote-guided4-k5-q30-v3-restart-sharp1-tau6-support3-pick"
GOALS = {"ca_drop": 0.02, "asr_over_floor": 0.01, "pa_gap": 0.03, "nfe": 20.0}
CONFIDENCE_BINS = (0.0, 0.5, 0.8, 0.95, 1.01)
SINK_DRAW_ROWS, SINK_DRAWS = (1000, 500, 300), 10
# the standard error shown next to each goal's measure: the CA drop's own (paired), else that of the rate it moves
SE_OF = {"ca_drop": "ca_drop_se", "asr_over_floor": "asr_se", "pa_gap": "pa_se"}


def load_zoo(path: Path) -> list[dict]:
    """The victims of a zoo manifest (`jobs/train_zoo.py` writes it), each with the absolute path of its file."""
    manifest = Path(path) / "zoo.json" if Path(path).is_dir() else Path(path)
    if not manifest.exists():
        raise FileNotFoundError(f"no zoo manifest at {manifest}: train the zoo with jobs/train_zoo.py")
    data = json.loads(manifest.read_text())
    victims = data.get("victims") or []
    if not victims:
        raise ValueError(f"{manifest} lists no victims")
    for v in victims:
        v["path"] = manifest.parent / v["file"]
        if not v["path"].exists():
            raise FileNotFoundError(f"victim {v['name']!r}: {v['path']} is missing")
    return victims


@dataclass
class _Memoised:
    images: np.ndarray  # uint8 (N, C, H, W)
    nfe: torch.Tensor

    def uint8(self) -> np.ndarray:
        return self.images


class MemoPurifier:
    """A purifier whose outputs are kept per (image bytes, key, seed). A purifier's output depends on exactly these
    (noise is seeded per key and seed, never per batch), so replaying a kept one is the same as recomputing it."""

    def __init__(self, base: Any, store: dict | None = None) -> None:
        self.base, self.name = base, base.name
        self.store: dict = {} if store is None else store
        self.computed = 0

    def params(self) -> dict[str, Any]:
        return self.base.params()

    @property
    def nominal_nfe(self) -> float:
        return self.base.nominal_nfe

    def __call__(self, images: np.ndarray, keys: list[str], seed: int = 0) -> _Memoised:
        images = np.asarray(images)
        ids = [(hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest(), str(k), int(seed))
               for img, k in zip(images, keys)]
        todo = [i for i, key in enumerate(ids) if key not in self.store]
        if todo:
            res = self.base(images[todo], [keys[i] for i in todo], seed)
            out, nfe = res.uint8(), res.nfe.numpy()
            for j, i in enumerate(todo):
                self.store[ids[i]] = (out[j], int(nfe[j]))
            self.computed += len(todo)
        got = [self.store[key] for key in ids]
        return _Memoised(np.stack([g[0] for g in got]), torch.tensor([g[1] for g in got], dtype=torch.long))


def memoised(base: Any, memo: dict) -> MemoPurifier:
    """`base` with its outputs kept in `memo`, under its name and params (one store per purifier setting)."""
    signature = json.dumps([base.name, base.params()], sort_keys=True, default=str)
    return MemoPurifier(base, memo.setdefault(signature, {}))


def memo_meta(model_name: str, model: Any, dtype: str) -> dict:
    """What a memo is valid for. Keyed by the weights too, since a retrained model keeps its preset name and folder;
    not by the images, since each entry names its own (bytes, key, seed), so runs over any images share a memo."""
    return {"model": model_name, "weights": model.fingerprint(), "dtype": dtype}


def load_memo(path: Path | None, meta: dict) -> dict:
    """The memo kept at `path` if it was made with `meta` (model, weights, dtype), else an empty one."""
    if path and path.exists():
        saved = pickle.loads(path.read_bytes())
        if saved.get("meta") == meta:
            return saved["memo"]
    return {}


def save_memo(path: Path, meta: dict, memo: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"meta": meta, "memo": memo}))


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n and not math.isnan(p) else float("nan")


def victim_row(victim: dict, label: str, clean_pred: np.ndarray, clean_orig: np.ndarray, clean_conf: np.ndarray,
               labels: np.ndarray, trig_pred: np.ndarray, trig_labels: np.ndarray, nfe: np.ndarray,
               trig_orig: np.ndarray) -> dict:
    """Metrics of one method on one victim, with binomial standard errors and the paired one of the CA drop, the
    clean images lost / won against the victim undefended, by the victim's confidence in its own answer, and what
    the job-end sink check (pipeline/flows.py, at its defaults) says of the clean and triggered rows together."""
    m = attack_metrics(clean_pred, labels, trig_pred, trig_labels, TARGET)
    und = attack_metrics(clean_orig, labels, np.zeros(0, np.int64), np.zeros(0, np.int64), TARGET)
    right_def, right_und = clean_pred == labels, clean_orig == labels
    diff = right_und.astype(float) - right_def.astype(float)
    lost, won = right_und & ~right_def, right_def & ~right_und
    bins = np.digitize(clean_conf, CONFIDENCE_BINS[1:-1])
    by_conf = [{"confidence": f"{lo:.2f}-{min(hi, 1.0):.2f}", "clean": int(np.sum(bins == b)),
                "lost": int(np.sum(lost & (bins == b))), "won": int(np.sum(won & (bins == b)))}
               for b, (lo, hi) in enumerate(zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]))]
    row = {"victim": victim["name"], "arch": victim["arch"], "attack": victim["attack"], "label": label,
           "ca": m["ca"], "pa": m["pa"], "asr": m["asr"], "floor": m["floor"], "ca_undefended": und["ca"],
           "ca_drop": float(diff.mean()), "ca_drop_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
           "ca_se": _se(m["ca"], m["n_clean"]), "pa_se": _se(m["pa"], m["n_poison"]),
           "asr_se": _se(m["asr"], m["n_poison"]), "floor_se": _se(m["floor"], m["n_clean_nontarget"]),
           "nfe": float(np.mean(nfe)), "n_clean": m["n_clean"], "n_triggered": m["n_poison"],
           "lost": int(lost.sum()), "won": int(won.sum()), "lost_won_by_confidence": by_conf}
    answered = np.concatenate([clean_pred, trig_pred]) >= 0
    flows = np.concatenate([clean_orig, trig_orig])[answered], np.concatenate([clean_pred, trig_pred])[answered]
    check = SinkCheckConfig().settings
    sinks = find_sinks(*flows, **check)
    row["sink"] = sinks[0].as_dict() if sinks else None
    # how often a smaller job (an audit's sample) would see it: the check on random subsets of these rows
    rng = np.random.default_rng(0)
    row["sink_draws"] = {str(size): sum(bool(find_sinks(*(f[idx] for f in flows), **check))
                                        for idx in (rng.choice(len(flows[0]), size, replace=False)
                                                    for _ in range(SINK_DRAWS)))
                         for size in SINK_DRAW_ROWS if size < len(flows[0])}
    row["asr_over_floor"] = row["asr"] - row["floor"]
    row["pa_gap"] = row["ca"] - row["pa"]
    row["meets"] = {k: bool(row[k] <= GOALS[k] + 1e-12) for k in GOALS}
    return row


def spread(rows: list[dict]) -> list[dict]:
    """Per method: the worst victim and the median for each goal's measure, and how many victims meet every goal."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        sub = [r for r in rows if r["label"] == label]
        s: dict[str, Any] = {"label": label, "victims": len(sub),
                             "meet_all": sum(all(r["meets"].values()) for r in sub)}
        for key in ("ca_drop", "asr_over_floor", "pa_gap"):
            worst = max(sub, key=lambda r: r[key])
            s[key] = {"worst": worst[key], "worst_victim": worst["victim"], "worst_se": worst[SE_OF[key]],
                      "median": float(np.median([r[key] for r in sub]))}
        s["nfe"] = {"worst": max(r["nfe"] for r in sub), "median": float(np.median([r["nfe"] for r in sub]))}
        out.append(s)
    return out


def run(victims: list[dict], methods: list[tuple[str, str, dict]], model: Any, n: int, seed: int,
        batch_size: int, dtype: str, memo: dict | None = None,
        offset: int = 0) -> Iterator[tuple[str, int, list[dict]]]:
    """Per method, in order: (label, images purified for it, one row per victim), on test images offset..offset+n."""
    clean4, labels = eval_images(n, offset)
    shape = (clean4.shape[1], clean4.shape[-1])
    keep = np.flatnonzero(labels != TARGET)
    triggered = {t: apply_trigger(clean4[keep], t) for t in dict.fromkeys(v["trigger"] for v in victims)}
    # keys name the test image, not its place in this run, so that runs at any offset can share a memo
    keys_clean = [f"clean-{offset + i}" for i in range(n)]
    memo = {} if memo is None else memo
    classifiers = {v["name"]: victim_classifier(v["path"].stem, v["path"].parent, shape) for v in victims}
    originals, trig_originals = {}, {}
    for v in victims:
        ans = classifiers[v["name"]](clean4)
        originals[v["name"]] = (ans.labels, np.asarray(ans.scores).max(1))
        trig_originals[v["name"]] = classifiers[v["name"]](triggered[v["trigger"]]).labels
    for label, method, params in methods:
        rows = []
        defense = build_purifier(method, model, params, dtype=dtype)
        base = defense.base if isinstance(defense, Cascade) else defense
        memo_base = memoised(base, memo)
        if isinstance(defense, Cascade):
            defense.base = memo_base
            runner: Any = defense
        else:
            runner = memo_base
        for v in victims:
            classify = classifiers[v["name"]]
            trig = triggered[v["trigger"]]
            keys_trig = [f"{v['trigger']}-{offset + i}" for i in keep]
            if method == "none":
                pc_labels, pt_labels, nfe = originals[v["name"]][0], trig_originals[v["name"]], np.zeros(n + len(keep))
            else:
                calibrate_vote(runner, classify, clean4)
                pc = run_defense(runner, clean4, keys_clean, seed, classify, batch_size)
                pt = run_defense(runner, trig, keys_trig, seed, classify, batch_size)
                pc_labels, pt_labels, nfe = pc.labels, pt.labels, np.concatenate([pc.nfe, pt.nfe])
            orig, conf = originals[v["name"]]
            rows.append(victim_row(v, label, pc_labels, orig, conf, labels, pt_labels, labels[keep], nfe,
                                   trig_originals[v["name"]]))
            if isinstance(runner, Cascade):
                rows[-1]["gate"] = runner.original_below
        yield label, memo_base.computed, rows


def _fmt(r: dict) -> str:
    def rate(key: str) -> str:
        return f"{r[key]:.3f}±{r[key + '_se']:.3f}"

    return f"{rate('ca')} / {rate('pa')} / {rate('asr')} ({r['floor']:.3f})"


def format_tables(rows: list[dict], summary: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    victims = list(dict.fromkeys(r["victim"] for r in rows))
    out = ["### Spread across victims (worst victim first)", "",
           "| method | mean NFE (worst) | CA drop: worst (victim) / median | ASR - floor: worst (victim) / median | "
           "CA - PA: worst (victim) / median | victims meeting every goal |",
           "|---|---|---|---|---|---|"]
    for s in summary:
        cells = [f"{s[k]['worst']:+.3f}±{s[k]['worst_se']:.3f} ({s[k]['worst_victim']}) / {s[k]['median']:+.3f}"
                 for k in ("ca_drop", "asr_over_floor", "pa_gap")]
        out.append(f"| {s['label']} | {s['nfe']['median']:.1f} ({s['nfe']['worst']:.1f}) | {' | '.join(cells)} | "
                   f"{s['meet_all']} / {s['victims']} |")
    out += ["", "### Per victim: CA / PA / ASR (floor), ± one standard error; mean NFE", "",
            "| victim | undefended CA | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for v in victims:
        sub = {r["label"]: r for r in rows if r["victim"] == v}
        first = next(iter(sub.values()))
        cells = [f"{_fmt(sub[lab])}, {sub[lab]['nfe']:.1f}" if lab in sub else "-" for lab in labels]
        out.append(f"| {v} | {first['ca_undefended']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sink_table(rows: list[dict]) -> str:
    """Per method, the victims on which the job-end sink check fires (rows measured before it existed: not shown)."""
    checked = [r for r in rows if "sink" in r and r["label"] != "none"]
    if not checked:
        return ""
    sizes = [str(n) for n in SINK_DRAW_ROWS]
    out = ["### The job-end sink check (`sink_check` defaults; each victim's clean and triggered rows together)", "",
           f"Flagged: the victims on which the check fires with all their rows. Draws: of {SINK_DRAWS} random "
           f"draws of {' / '.join(sizes)} of a victim's rows, how many it fires on, summed over the victims.", "",
           f"| method | victims checked | flagged | draws of {' / '.join(sizes)} rows flagged | the sink: classes "
           "absorbed, of the others |", "|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in checked):
        sub = [r for r in checked if r["label"] == label]
        hit = [r for r in sub if r["sink"]]
        what = ", ".join(f"{r['victim']} (class {r['sink']['class']}: {len(r['sink']['absorbed'])} of "
                         f"{r['sink']['others']})" for r in hit) or "-"
        draws = " / ".join(f"{sum(r.get('sink_draws', {}).get(n, 0) for r in sub)} of {SINK_DRAWS * len(sub)}"
                           for n in sizes)
        out.append(f"| {label} | {len(sub)} | {len(hit)} | {draws} | {what} |")
    return "\n".join(out) + "\n\n"


def lost_won_table(row: dict) -> str:
    out = [f"Clean images of {row['victim']} under {row['label']}: lost {row['lost']} (right undefended, wrong "
           f"defended), won {row['won']}, by the victim's probability for its own (undefended) answer.", "",
           "| victim's confidence | clean images | lost | won |", "|---|---|---|---|"]
    out += [f"| {b['confidence']} | {b['clean']} | {b['lost']} | {b['won']} |" for b in row["lost_won_by_confidence"]]
    return "\n".join(out)


def _shown(path: Path) -> str:
    """A path as results should name it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def merged_rows(path: Path, running: set[tuple[str, str]], setup: dict) -> list[dict]:
    """The rows of an earlier run at `path` for (victim, method label) pairs not in `running`. An earlier run with
    another model (or other weights under its name), image count or offset, seed or dtype measured something else,
    so merging into it fails."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    made = {"offset": 0, **saved["meta"]}  # runs from before --offset started at the first image
    theirs = {k: made.get(k) for k in setup}
    if theirs != setup:
        raise SystemExit(f"--merge: {path} was made with {theirs}, this run is {setup}")
    return [r for r in saved["rows"] if (r["victim"], r["label"]) not in running]


def main(argv: list[str] | None = None) -> int:
    from pipeline.bench import GRID

    ap = argparse.ArgumentParser(prog="python -m pipeline zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ZOO_DIR, help="folder with zoo.json (or the manifest itself)")
    ap.add_argument("--only", default=",".join(DEFAULT_METHODS), help="comma-separated labels of the bench grid")
    ap.add_argument("--vote", action="append", default=[], metavar="LABEL=JSON",
                    help='also run a vote with these cascade params, e.g. \'k6={"steps": 4, "k": 6}\' (repeatable)')
    ap.add_argument("--victims", help="comma-separated victim names (default: all)")
    ap.add_argument("--n", type=int, default=1000, help="clean test images (their non-target ones are triggered)")
    ap.add_argument("--offset", type=int, default=0,
                    help="the first test image used (past 1000: images no setting was chosen on)")
    ap.add_argument("--model", default="fmnist-tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memo", type=Path,
                    help="keep purified images in this file across runs (same model weights and dtype)")
    ap.add_argument("--out", type=Path, default=Path("out/zoo"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out/results.json for the victims and methods not run now (same model, "
                         "n, seed, dtype), so that new victims or methods join a committed run without recomputing it")
    args = ap.parse_args(argv)

    grid = {label: (label, method, params) for label, method, params in GRID}
    wanted = [w for w in args.only.split(",") if w]
    unknown = [w for w in wanted if w not in grid]
    if unknown:
        raise SystemExit(f"unknown method labels {unknown}; the bench grid has {sorted(grid)}")
    for spec in args.vote:
        label, _, text = spec.partition("=")
        try:
            params = json.loads(text)
        except ValueError as exc:
            raise SystemExit(f"--vote {spec!r}: the params must be a JSON object ({exc})") from exc
        if not label or not isinstance(params, dict):
            raise SystemExit(f"--vote {spec!r}: expected LABEL={{...}}")
        grid[label] = (label, "cascade", params)
        wanted.append(label)
    total = len(load_dataset("fmnist", "test")[1])
    if args.n < 1 or args.offset < 0 or args.offset + args.n > total:
        raise SystemExit(f"--n {args.n} --offset {args.offset}: the images must lie within the {total} test images")
    victims = load_zoo(args.zoo)
    if args.victims:
        names = args.victims.split(",")
        victims = [v for v in victims if v["name"] in names]
        if len(victims) != len(names):
            raise SystemExit(f"unknown victims among {names}")
    device = pick_device(args.device)
    model = load_model(args.model, device)
    meta_of_memo = memo_meta(args.model, model, args.dtype)
    memo = load_memo(args.memo, meta_of_memo)
    t0 = time.time()
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {"model": args.model, "weights": meta_of_memo["weights"], "n": args.n, "offset": args.offset,
             "seed": args.seed, "dtype": args.dtype}
    running = {(v["name"], w) for v in victims for w in wanted}
    kept = merged_rows(args.out / "results.json", running, setup) if args.merge else []
    for label, computed, got in run(victims, [grid[w] for w in wanted], model, args.n, args.seed, args.batch_size,
                                    args.dtype, memo, args.offset):
        rows += got
        print(f"[{time.time() - t0:6.0f}s] {label}: {computed} images purified", flush=True)
        if args.memo:  # after each method, so that a stopped run keeps what it computed
            save_memo(args.memo, meta_of_memo, memo)
    seconds = round(time.time() - t0, 1)
    rows = kept + rows
    summary = spread(rows)
    n_victims = len({r["victim"] for r in rows})
    meta = {**setup, "device": device, "zoo": _shown(args.zoo), "victims": n_victims, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "seconds": seconds,
            "victims_run": len(victims), "victims_merged": n_victims - len(victims), "rows_merged": len(kept)}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    text = report(meta, rows, summary, wanted[-1])
    (args.out / "results.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'results.md'} and results.json")
    return 0


def report(meta: dict, rows: list[dict], summary: list[dict], last_run: str) -> str:
    """results.md: the tables, and the clean images lost / won on the worst victim of the default (of the method
    run last when the default is not among the rows, merged ones included)."""
    labels = {r["label"] for r in rows}
    worst = [r for r in rows if r["label"] == (DEFAULT_LABEL if DEFAULT_LABEL in labels else last_run)]
    worst_row = max(worst, key=lambda r: r["ca_drop"])
    kept = meta["rows_merged"]
    merged = f" ({kept} victim x method rows kept from the earlier run)" if kept else ""
    start = meta.get("offset", 0)
    which = f"first {meta['n']} test images" if not start else f"{meta['n']} test images from index {start}"
    return (f"Model {meta['model']} on {meta['device']}, {meta['victims']} victims{merged}, {which} "
            f"(clean) and their non-target ones triggered, seed {meta['seed']}, {meta['seconds']}s.\n\n"
            f"{format_tables(rows, summary)}\n\n{sink_table(rows)}{lost_won_table(worst_row)}\n")
