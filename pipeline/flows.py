"""Where purification moves rows between the black box's classes, and the one flow that says its labels are void.

A row flows from class c to class d when the black box answers c on the original image and d on the purified one.
An ordinary backdoor shows one class that *loses* rows: triggered images leave the target for their true classes,
each to its own. Purification itself moves a few rows between classes that look alike (a shirt read as a
pullover), from one or two classes into another. A black box trained *through* the defense (its backdoor answers
the look of a purified image) shows the opposite of the ordinary case: one class that *absorbs* a share of the rows
of most other classes, clean images that the victim was sure of. So does a purifier whose marks an ordinary
backdoor reads as its trigger (a warp-trained victim and a smoothing purifier), and so would a purifier too strong
for its prior, whose outputs no longer look like their classes. Such a class is a sink, and while there is one the
purified labels are not to be trusted, whatever the vote decided: the job says so (`Summary.sinks`, exit code 3),
and so does the audit.

A class d absorbs class c when the 95% Wilson lower bound of the share of c's rows that end in d is at least
`absorb_rate` (judged only for classes with `min_class_rows` rows); d is a sink when it absorbs at least
`class_share` of the other classes, and never fewer than `MIN_SINK_CLASSES` (with fewer, two look-alike classes
flowing into a third would pass for one). The settings and their defaults: `SinkCheckConfig` (pipeline/config.py).
Torch-free: the driver runs it on the job's output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

MIN_SINK_CLASSES = 3
# What a sink means, for the job's log and the audit's alert.
SINK_MEANING = ("the black box's backdoor fires on the purified images themselves (it was trained through the "
                "defense, or reads the purifier's marks as its trigger), or purification no longer keeps what its "
                "classes look like; either way the purified labels are not to be trusted (docs/zoo.md, 'The sink "
                "check')")


def wilson_lower(successes: int, n: int, z: float = 1.96) -> float:
    """95% Wilson lower bound of a rate: ranks 40 rows in 50 above 1 in 1, and a share of few rows low."""
    if n == 0:
        return 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)


@dataclass(frozen=True)
class Sink:
    """A class that absorbs rows of many others: `absorbed` maps each such class to (its rows, rows moved here)."""

    klass: int
    absorbed: dict[int, tuple[int, int]]
    others: int  # the other classes the black box answered on original images

    @property
    def rows_in(self) -> int:
        return sum(moved for _, moved in self.absorbed.values())

    def describe(self) -> str:
        shares = ", ".join(f"{c}: {moved}/{rows}" for c, (rows, moved) in sorted(self.absorbed.items()))
        return (f"class {self.klass} absorbs {len(self.absorbed)} of {self.others} other classes after "
                f"purification (rows moved into it / the class's rows: {shares})")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("klass")
        d["absorbed"] = {str(c): {"rows": r, "moved": m} for c, (r, m) in sorted(self.absorbed.items())}
        d["rows_in"] = self.rows_in
        return d


def find_sinks(orig: np.ndarray, purified: np.ndarray, counts: np.ndarray | None = None, *,
               absorb_rate: float, class_share: float, min_class_rows: int) -> list[Sink]:
    """Sinks among the flows `orig[i] -> purified[i]` (each seen `counts[i]` times, 1 by default), largest first.

    Give the answered rows only: a failed query has no class. Sparse on purpose: a model with 20,000 classes has no
    room for a square matrix of them.
    """
    orig = np.asarray(orig, np.int64)
    purified = np.asarray(purified, np.int64)
    counts = np.ones(len(orig), np.int64) if counts is None else np.asarray(counts, np.int64)
    if not (len(orig) == len(purified) == len(counts)):
        raise ValueError("orig, purified and counts must have one entry per flow")
    classes, inv = np.unique(orig, return_inverse=True)
    rows = np.bincount(inv, weights=counts).astype(np.int64)
    rows_of = dict(zip(classes.tolist(), rows.tolist()))
    eligible = {c for c, r in rows_of.items() if r >= min_class_rows}
    moved = orig != purified
    pairs, pair_inv = np.unique(np.stack([orig[moved], purified[moved]], 1), axis=0, return_inverse=True)
    pair_counts = np.bincount(pair_inv.reshape(-1), weights=counts[moved]).astype(np.int64)
    absorbed: dict[int, dict[int, tuple[int, int]]] = {}
    for (c, d), k in zip(pairs.tolist(), pair_counts.tolist()):
        if c in eligible and wilson_lower(k, rows_of[c]) >= absorb_rate:
            absorbed.setdefault(d, {})[c] = (rows_of[c], k)
    sinks = []
    for d, got in absorbed.items():
        # Out of every other class answered, not only those with enough rows: a small job, whose classes mostly
        # fall short of min_class_rows, must not call a sink on the two or three it can judge.
        others = len(set(rows_of) - {d})
        if len(got) >= max(MIN_SINK_CLASSES, math.ceil(class_share * others)):
            sinks.append(Sink(klass=int(d), absorbed=got, others=others))
    return sorted(sinks, key=lambda s: (-len(s.absorbed), -s.rows_in, s.klass))


def sinks_in_table(table: pa.Table, *, absorb_rate: float, class_share: float, min_class_rows: int) -> list[Sink]:
    """`find_sinks` over a job's output rows (`pred_orig`, `pred_purified`); error rows, which have neither, left
    out. Counted by Arrow: a job's output can hold more rows than are worth a Python object each."""
    if not {"pred_orig", "pred_purified"} <= set(table.column_names):
        return []
    pairs = (table.select(["pred_orig", "pred_purified"]).drop_null()
             .group_by(["pred_orig", "pred_purified"]).aggregate([([], "count_all")]))
    return find_sinks(pairs["pred_orig"].to_numpy(), pairs["pred_purified"].to_numpy(),
                      pairs["count_all"].to_numpy(), absorb_rate=absorb_rate, class_share=class_share,
                      min_class_rows=min_class_rows)
