"""In-process evaluation of a defense against the attack kit, through the black box (no Ray): the `eval` verb and
the benchmark both use it. Purification never sees labels or victims; only the cascade asks the black box."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeline.attacks import TARGET, apply_trigger
from pipeline.blackbox import open_blackbox
from pipeline.blackbox.base import InputSpec, Prediction
from pipeline.datasets import load_dataset
from pipeline.gate import top_probability
from pipeline.metrics import attack_metrics, flag_confusion
from pipeline.paths import REPO_ROOT
from pipeline.purify import Cascade, Purifier, build_purifier, load_model
from pipeline.purify.cascade import Answer

VICTIMS_DIR = REPO_ROOT / "models" / "victims"


class PeakRSS:
    """Peak memory while the block runs, sampled (ru_maxrss cannot be reset between methods).

    `tree=False`: resident set of the process. `tree=True`: proportional set size of the process and all its
    descendants (a local Ray cluster's raylet, workers and object store), so shared pages count once. `pid`: the
    process to watch (default: this one)."""

    def __init__(self, interval: float = 0.05, tree: bool = False, pid: int | None = None) -> None:
        self.interval, self.tree, self.peak, self._stop = interval, tree, 0, threading.Event()
        self.pid = pid

    def sample(self) -> int:
        try:
            me = psutil.Process(self.pid)
        except psutil.NoSuchProcess:  # the watched process just ended
            return 0
        if not self.tree:
            return me.memory_info().rss
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def victim_classifier(attack: str, victims_dir: Path | None = None,
                      shape: tuple[int, int] = (1, 28)) -> Callable[[np.ndarray], Prediction]:
    """The ONNX victim for `attack`, taking uint8 images of (channels, size) = `shape`; answers with labels and
    probabilities (the cascade's original-label gate reads them)."""
    path = Path(victims_dir or VICTIMS_DIR) / f"{attack}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"no victim for {attack!r} at {path}: train one with jobs/train_victim.py")
    bb = open_blackbox(f"onnx:{path}", InputSpec(size=shape[1], channels=shape[0]))

    def classify(x: np.ndarray) -> Prediction:
        return bb.predict(np.ascontiguousarray(x))

    return classify


@dataclass
class Pass:
    labels: np.ndarray  # defended labels
    pred_orig: np.ndarray  # labels of the unpurified images
    nfe: np.ndarray
    seconds: float


@dataclass
class Purified:
    images: np.ndarray
    nfe: np.ndarray
    seconds: float


def purify_all(defense: Purifier, images: np.ndarray, keys: Sequence[str], seed: int,
               batch_size: int = 256) -> Purified:
    t0 = time.perf_counter()
    outs, nfe = [], []
    for s in range(0, len(images), batch_size):
        res = defense(images[s: s + batch_size], list(keys[s: s + batch_size]), seed)
        outs.append(res.uint8())
        nfe.append(res.nfe.numpy())
    return Purified(np.concatenate(outs), np.concatenate(nfe).astype(float), time.perf_counter() - t0)


def run_defense(defense: Purifier | Cascade, images: np.ndarray, keys: Sequence[str], seed: int,
                classify: Callable[[np.ndarray], Prediction], batch_size: int = 256,
                purified: Purified | None = None) -> Pass:
    """Defended labels for `images`; single-pass methods may hand in images purified earlier (victim-independent)."""
    if isinstance(defense, Cascade):
        t0 = time.perf_counter()
        outs = [defense.run(images[s: s + batch_size], list(keys[s: s + batch_size]), seed, classify)
                for s in range(0, len(images), batch_size)]
        return Pass(np.concatenate([o.labels for o in outs]), np.concatenate([o.pred_orig for o in outs]),
                    np.concatenate([o.nfe for o in outs]).astype(float), time.perf_counter() - t0)
    p = purified or purify_all(defense, images, keys, seed, batch_size)
    return Pass(classify(p.images).labels, classify(images).labels, p.nfe, p.seconds)


def calibrate_vote(defense: Purifier | Cascade, classify: Callable[[np.ndarray], Prediction],
                   first: np.ndarray) -> float | None:
    """Measure a vote's gate in process as `sanitize` does, on the first rows of `first`. The benchmarks hand it
    clean images, what a job whose data is mostly clean measures (a few poisoned rows among them move the quantile
    by their share). None when the method has no measured gate."""
    if not isinstance(defense, Cascade) or defense.original_quantile is None or not defense.original_votes:
        return None
    rows = first[: defense.calibration_rows]
    a = Answer.of(classify(rows), len(rows))
    return defense.calibrate(top_probability(a.labels, a.scores))


def eval_images(n: int, offset: int = 0, data: str = "fmnist") -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_dataset(data, "test")
    idx = np.arange(offset, offset + n) % len(images)
    return images[idx], labels[idx]


def evaluate(defense: Purifier | Cascade, attacks: Sequence[str], n: int = 500, seed: int = 0,
             batch_size: int = 256, method: str = "", params: dict[str, Any] | None = None,
             data: str = "fmnist", victims_dir: Path | None = None) -> list[dict]:
    """One row per attack: CA, PA, ASR, floor, flag precision/recall, mean NFE, img/s, peak RSS."""
    clean, labels = eval_images(n, data=data)
    keys_clean = [f"clean-{i}" for i in range(n)]
    clean_purified: Purified | None = None
    rows = []
    for attack in attacks:
        classify = victim_classifier(attack, victims_dir, (clean.shape[1], clean.shape[-1]))
        trig = apply_trigger(clean, attack)
        gate = calibrate_vote(defense, classify, clean)
        with PeakRSS() as mem:
            if not isinstance(defense, Cascade) and clean_purified is None:
                clean_purified = purify_all(defense, clean, keys_clean, seed, batch_size)
            pc = run_defense(defense, clean, keys_clean, seed, classify, batch_size, clean_purified)
            pt = run_defense(defense, trig, [f"{attack}-{i}" for i in range(n)], seed, classify, batch_size)
        m = attack_metrics(pc.labels, labels, pt.labels, labels, TARGET)
        undefended = attack_metrics(pc.pred_orig, labels, pt.pred_orig, labels, TARGET)
        fc = flag_confusion(np.concatenate([pc.labels != pc.pred_orig, pt.labels != pt.pred_orig]),
                            np.concatenate([np.zeros(n, bool), labels != TARGET]))
        secs = pc.seconds + pt.seconds
        rows.append({
            "attack": attack, "method": method or getattr(defense, "name", "?"), "params": params or {},
            "ca": m["ca"], "pa": m["pa"], "asr": m["asr"], "floor": m["floor"],
            "ca_undefended": undefended["ca"], "pa_undefended": undefended["pa"],
            "asr_undefended": undefended["asr"], "floor_undefended": undefended["floor"],
            "flag_precision": fc["precision"], "flag_recall": fc["recall"],
            "nfe": float(np.concatenate([pc.nfe, pt.nfe]).mean()),
            "img_per_s": 2 * n / secs if secs > 0 else float("nan"), "peak_rss_mib": mem.mib, "n": n,
            **({"gate": gate} if gate is not None else {}),
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ("| attack | method | params | CA | PA | ASR | floor | flag P | flag R | NFE | img/s | peak MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        out.append(f"| {r['attack']} | {r['method']} | {p} | {r['ca']:.3f} | {r['pa']:.3f} | {r['asr']:.3f} | "
                   f"{r['floor']:.3f} | {r['flag_precision']:.2f} | {r['flag_recall']:.2f} | {r['nfe']:.1f} | "
                   f"{r['img_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(out)


def evaluate_config(cfg, attacks: Sequence[str], n: int = 500) -> str:
    """The `eval` verb: the configured model + method against each attack, undefended numbers alongside."""
    model = load_model(cfg.model.name, _device(cfg.model.device))
    defense = build_purifier(cfg.purify.method, model, cfg.purify.params, dtype=cfg.model.dtype)
    rows = evaluate(defense, attacks, n=n, seed=cfg.purify.seed, batch_size=cfg.resources.purify_batch_size,
                    method=cfg.purify.method, params=defense.params())
    und = [{**r, "method": "none", "params": {}, "ca": r["ca_undefended"], "asr": r["asr_undefended"],
            "pa": r["pa_undefended"], "floor": r["floor_undefended"], "nfe": 0.0, "flag_precision": float("nan"),
            "flag_recall": float("nan"), "img_per_s": float("nan"), "peak_rss_mib": float("nan")} for r in rows]
    return format_rows(und + rows)


def _device(device: str) -> str:
    from pipeline.purify.models import pick_device

    return pick_device(device)
