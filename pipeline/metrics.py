"""CA / PA / ASR / floor and trigger-flag confusion counts.

CA: accuracy on purified clean images. PA: accuracy on purified triggered images against their true labels (images
whose true label is the target excluded). ASR: share of purified triggered images labelled as the target. Floor:
share of purified clean images of other classes labelled as the target, what ASR still shows after a perfect
trigger removal (docs/methods.md).

A failed query (label -1) is counted as a wrong answer everywhere and reported in ``failed``: dropping such rows
would silently inflate CA and PA and deflate ASR when an endpoint misbehaves.
"""

from __future__ import annotations

import numpy as np

from .attacks import TARGET


def _labels(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a.astype(np.int64)


def _rate(num: int, den: int) -> float:
    # NaN, not 0, for an empty denominator: "no data" must not read as a perfect (or zero) score
    return float(num) / den if den else float("nan")


def attack_metrics(clean_pred: np.ndarray, clean_true: np.ndarray, poison_pred: np.ndarray, poison_true: np.ndarray,
                   target: int = TARGET) -> dict:
    """CA on clean rows; PA, ASR on triggered rows whose true label != target; floor on clean non-target rows.

    Returns ca, pa, asr, floor (floats, NaN when the denominator is empty) and the counts behind them:
    n_clean, n_poison (non-target triggered rows used), n_poison_excluded (triggered rows of the target class),
    n_clean_nontarget, clean_correct, poison_correct, poison_to_target, clean_to_target,
    failed = {"clean": rows with pred -1, "poison": non-target triggered rows with pred -1}.
    """
    cp, ct = _labels(clean_pred, "clean_pred"), _labels(clean_true, "clean_true")
    pp, pt = _labels(poison_pred, "poison_pred"), _labels(poison_true, "poison_true")
    if cp.shape != ct.shape or pp.shape != pt.shape:
        raise ValueError(f"pred/true length mismatch: clean {cp.shape} vs {ct.shape}, poison {pp.shape} vs {pt.shape}")
    keep = pt != target
    pp_k, pt_k = pp[keep], pt[keep]
    nontarget = ct != target
    clean_correct = int(np.sum((cp == ct) & (cp >= 0)))
    poison_correct = int(np.sum((pp_k == pt_k) & (pp_k >= 0)))
    poison_to_target = int(np.sum(pp_k == target))
    clean_to_target = int(np.sum(cp[nontarget] == target))
    return {
        "ca": _rate(clean_correct, len(cp)),
        "pa": _rate(poison_correct, len(pp_k)),
        "asr": _rate(poison_to_target, len(pp_k)),
        "floor": _rate(clean_to_target, int(nontarget.sum())),
        "n_clean": int(len(cp)),
        "n_poison": int(len(pp_k)),
        "n_poison_excluded": int((~keep).sum()),
        "n_clean_nontarget": int(nontarget.sum()),
        "clean_correct": clean_correct,
        "poison_correct": poison_correct,
        "poison_to_target": poison_to_target,
        "clean_to_target": clean_to_target,
        "failed": {"clean": int(np.sum(cp < 0)), "poison": int(np.sum(pp_k < 0))},
    }


def flag_confusion(flagged: np.ndarray, triggered: np.ndarray) -> dict:
    """How well a per-image flag (e.g. 'label flipped after purification') finds triggered images."""
    f = np.asarray(flagged).astype(bool)
    t = np.asarray(triggered).astype(bool)
    if f.shape != t.shape or f.ndim != 1:
        raise ValueError(f"flagged and triggered must be 1-D of the same length, got {f.shape} and {t.shape}")
    tp = int(np.sum(f & t))
    fp = int(np.sum(f & ~t))
    fn = int(np.sum(~f & t))
    tn = int(np.sum(~f & ~t))
    precision = _rate(tp, tp + fp)
    recall = _rate(tp, tp + fn)
    if tp == 0:
        f1 = 0.0 if (tp + fp + fn) else float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}
