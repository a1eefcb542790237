"""Query-guided cascade: purify, ask the black box, and spend more passes only where the answers call for it.

Two escalation rules, both ending in a majority vote of up to k purified labels:
- `flip` (the flip cascade): rows whose first purified label equals the original label stop after one pass; only
  rows whose label flipped get more passes. Clean images rarely flip, so the extra NFE lands on triggered images,
  and the vote undoes most clean images that one noisy pass pushed into a wrong class.
- `always` (ours): every row is voted on. A single pass that leaves a trigger intact decides a flip cascade's
  answer; a vote needs most passes to fail, so if one pass fails with probability p, a vote of k = 3 fails with
  about 3p^2.
Passes stop as soon as the vote is decided (the leader cannot be caught by the passes left), so `always` with k = 3
costs two passes, and three only where the first two disagree.

The original label can cast `original_votes` ballots, but only where the black box's own probability for it is
below a threshold (ours, on by default): a trigger is a shortcut that makes the model certain, while the clean
images that noisy passes push into a wrong class are mostly ones the model was unsure about. So the original helps
where purification costs clean accuracy, and stays out where it would vote for a trigger. A label-only black box
(no scores) never opens the gate, which leaves the plain vote.

The threshold is either fixed (`original_below`) or, with `original_quantile` q, measured once per job on the black
box's own answers: the q-quantile of its top probability on the job's first `calibration_rows` images
(`Cascade.calibrate`). "Certain" is a property of each model (label smoothing caps a victim's probabilities near .9,
a long unregularised training puts most clean images above .99), so a fixed probability opens the gate for every
triggered image of one victim and for no clean image of another; a rank within the model's own answers means the
same thing for both.

The ballots also need the passes' support (`original_support` m): they count only while the black box, asked about
the passes run so far, gives the original label a mean probability of at least m. Purification takes a trigger's
effect away, so the passes of a triggered image give the target little probability even where the victim's own
answer was unsure enough to open the gate; a clean image the model was unsure about keeps some probability for its
label through the passes. The support is re-read after every pass, and the stopping rule reads the ballots as they
stand.

Once the passes out-vote the original label, `pick` says which of the classes they voted wins: `probability` (ours,
the default) the one to which the black box gives the most probability summed over the passes, `votes` the one with
the most votes. A pass answering "c at .45, d at .40" is a full vote for c but nearly as much evidence for d; on an
image the passes split over, the summed probabilities read that evidence, the counts do not. The original label
itself never re-enters here, so a triggered image's target cannot win this way. A black box without scores picks
by votes. What these rules measure: docs/methods.md and docs/zoo.md.

The rounds are written once, as generators (`Cascade.steps`, `one_pass_steps`) that yield what they need next, a
purifier pass (`PurifyStep`) or a query (`QueryStep`), and receive the answer. `drive` runs them inline with a plain
callable black box (uint8 batch -> labels or a `Prediction`); the pipeline's purify stage drives the same generators
asynchronously against the black-box service. So this module stays free of Ray and HTTP, and both decide alike.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.gate import GATE_DEFAULTS, gate_threshold
from pipeline.purify.base import Purifier

# A black box for the cascade: uint8 batch -> labels, or anything with `.labels` and `.scores` (N, K) probabilities
# (e.g. `blackbox.base.Prediction`); scores open the original-label gate.
Classify = Callable[[np.ndarray], Any]

# The default method: a majority vote of up to 5 `guided` passes (GUIDED_BASE: 4 guided steps, restarting where the
# locator removed something, trusting blocks the locator moved by up to 0.6 rather than guided's own 0.4 (the restart
# already keeps a removed patch out, so more of a clean image's coarse content can be kept), unsharp-masked at
# amount 1 rather than 0.5: a vote's passes are read by a victim that may take smoothness for a warp trigger),
# stopped once decided; the original label casts 3 ballots where the black box gave it less than its own
# 0.3-quantile, measured on the job's first 256 rows, and only while the passes give it a mean probability of at
# least 0.3 (`original_support`). Passes that keep more of a clean image need the original's ballots less, so the
# gate opens for fewer rows, and fewer triggered ones among them. `original_below` (.95) is the fixed gate used when
# `original_quantile` is null. With `base: sdedit`, SDEDIT_BASE fills what the user leaves out (a plain-SDEdit
# vote); other bases use their own defaults. Chosen on the worst victim of the zoo (`python -m pipeline zoo`,
# docs/zoo.md). Where the passes out-vote the original label, the class they voted that the black box gives the
# most probability summed over them wins (`pick`).
DEFAULTS: dict = {"base": "guided", "k": 5, "escalate": "always", "pick": "probability", **GATE_DEFAULTS}
GUIDED_BASE: dict = {"steps": 4, "restart_tau": 0.8, "tau": 0.6, "sharpen": 1.0}
SDEDIT_BASE: dict = {"t_start": 300, "steps": 8, "eta": 1.0}
ESCALATE = ("flip", "always")
PICK = ("probability", "votes")
K_MAX = 64  # passes per image: a vote of more is a configuration mistake, not a setting


def escalation_seeds(seed: int, k: int) -> list[int]:
    """Seeds of the extra passes; pass 0 uses `seed` itself."""
    return [seed + 7919 * j for j in range(1, k)]


def majority(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row majority of integer labels (N, m); -1 = no vote. Ties go to the earliest column among the tied.

    Returns (labels, share of valid votes that agree with the winner)."""
    n, m = votes.shape
    labels = np.full(n, -1, dtype=np.int64)
    agree = np.zeros(n, dtype=np.float32)
    for i in range(n):
        row = votes[i][votes[i] >= 0]
        if row.size == 0:
            continue
        vals, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        win = best[np.argmin(first[best])]
        labels[i] = vals[win]
        agree[i] = counts[win] / row.size
    return labels, agree


def vote_counts(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the largest and the second-largest count of one label among valid votes (N, m); -1 = no vote.

    Labels are ranked first, so the work is bounded by the number of votes, not by the largest label id a black
    box may answer."""
    n = len(votes)
    valid = votes >= 0
    if votes.size == 0 or not valid.any():
        return np.zeros(n, np.int64), np.zeros(n, np.int64)
    _, rank = np.unique(votes[valid], return_inverse=True)
    counts = np.zeros((n, int(rank.max()) + 1), np.int64)
    r, _ = np.nonzero(valid)
    np.add.at(counts, (r, rank), 1)
    top2 = -np.sort(-counts, axis=1)[:, :2]
    return top2[:, 0], (top2[:, 1] if top2.shape[1] > 1 else np.zeros(n, np.int64))


def original_ballots(pred_orig: np.ndarray, score_orig: np.ndarray | None, votes: int,
                     below: float | None) -> np.ndarray:
    """(N, votes) ballots of the original label: the label where the black box's probability for it (`score_orig`,
    NaN = unknown) is below `below`, -1 elsewhere; `below` None: everywhere."""
    n = len(pred_orig)
    if below is None:
        opens = np.ones(n, bool)
    elif score_orig is None:
        opens = np.zeros(n, bool)
    else:
        s = np.asarray(score_orig, np.float32)  # compared in the scores' own precision: 0.95 is not below 0.95
        opens = ~np.isnan(s) & (s < np.float32(below))
    label = np.where(opens & (pred_orig >= 0), pred_orig, -1).astype(np.int64)
    return np.repeat(label[:, None], votes, axis=1)


def supported(score_orig: np.ndarray | None, support: np.ndarray, least: float) -> np.ndarray | None:
    """The original's probabilities (`score_orig`, NaN = unknown) where the passes' mean probability for the original
    label (`support`, NaN = unknown) is at least `least`, NaN elsewhere: what `original_ballots` reads, so that
    unsupported rows cast no ballot. `least` 0: the original's probabilities as they are."""
    if score_orig is None or least <= 0:
        return score_orig
    s = np.asarray(score_orig, np.float32)
    ok = ~np.isnan(support) & (support >= np.float32(least))
    return np.where(ok, s, np.float32(np.nan))


def needs_pass(pred_orig: np.ndarray, votes: np.ndarray, k: int, escalate: str,
               ballots: np.ndarray | None = None) -> np.ndarray:
    """Rows that get pass j = votes.shape[1] (1 <= j < k), given the purified labels of passes 0..j-1 (-1 = none)
    and the original label's ballots (`original_ballots`; None = none).

    A row stops once its vote is decided: the leading label leads by more than the passes left, so the final
    majority is the one a full k-pass vote would give, ties included."""
    if escalate not in ESCALATE:
        raise ValueError(f"escalate must be one of {ESCALATE}, got {escalate!r}")
    j = votes.shape[1]
    want = votes[:, 0] != pred_orig if escalate == "flip" else np.ones(len(votes), bool)
    first, second = vote_counts(_pool(votes, ballots))
    return want & (first <= second + (k - j))


def _pool(votes: np.ndarray, ballots: np.ndarray | None) -> np.ndarray:
    # Ballots go last: `majority` breaks ties towards the earliest column, i.e. towards the purified passes.
    return votes if ballots is None or ballots.shape[1] == 0 else np.concatenate([votes, ballots], 1)


@dataclass(frozen=True)
class Answer:
    """A Classify answer, normalised: labels (-1 = none), each row's own-label probability (NaN = unknown), the
    full scores when given, and per-row failures with whether a later run may succeed."""

    labels: np.ndarray
    own_score: np.ndarray
    scores: np.ndarray | None
    errors: list[str | None]
    retryable: np.ndarray

    @classmethod
    def of(cls, answer: Any, n: int) -> Answer:
        labels = np.asarray(getattr(answer, "labels", answer), dtype=np.int64).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"the black box answered {len(labels)} rows for {n} images")
        errors = list(getattr(answer, "errors", None) or [None] * n)
        retry = getattr(answer, "retryable", None)
        retryable = np.zeros(n, bool) if retry is None else np.asarray(retry, bool)
        scores = getattr(answer, "scores", None)
        if scores is not None:
            scores = np.asarray(scores, np.float32)
            if scores.ndim != 2 or len(scores) != n:
                scores = None
        missing = [i for i in range(n) if errors[i] is None and labels[i] < 0]
        for i in missing:  # a label-less answer without a reason is still a failure, and says so
            errors[i] = "black box gave no label"
            retryable[i] = True
        return cls(labels, _probability(scores, labels), scores, errors, retryable)

    def score_of(self, labels: np.ndarray, offset: int = 0) -> np.ndarray:
        """The probability of `labels[i]` in answer row `offset + i` (NaN where unknown)."""
        return _probability(self.scores, labels, offset)


def _probability(scores: np.ndarray | None, labels: np.ndarray, offset: int = 0) -> np.ndarray:
    out = np.full(len(labels), np.nan, np.float32)
    if scores is not None:
        ok = (labels >= 0) & (labels < scores.shape[1])
        out[ok] = scores[offset + np.flatnonzero(ok), labels[ok]]
    return out


@dataclass(frozen=True)
class PurifyStep:
    """The rounds ask their driver to run the base purifier on batch rows `rows` with `seed`; the driver sends
    back (uint8 images (len(rows), C, H, W), nfe (len(rows),))."""

    rows: np.ndarray
    seed: int


@dataclass(frozen=True)
class QueryStep:
    """The rounds ask their driver to classify uint8 `images`; the driver sends back a Classify answer."""

    images: np.ndarray


@dataclass
class Decision:
    """What the rounds decided for each row of a batch."""

    images: np.ndarray  # uint8 (N, C, H, W): the purified image that carries the defended label
    pred_orig: np.ndarray  # the black box on the original image (-1 = none)
    score_orig: np.ndarray  # its probability for that label (NaN = unknown)
    labels: np.ndarray  # the defended labels (-1 = none)
    score_purified: np.ndarray  # the black box's probability for the defended label on `images` (NaN = unknown)
    flag_score: np.ndarray  # how suspicious the row is (higher = more)
    nfe: np.ndarray  # diffusion network evaluations spent per row
    errors: list[str | None]  # why a row has no decision (a black-box failure); None when fine
    retryable: np.ndarray  # per row: the failure can pass by itself, so a later run must try again
    votes: np.ndarray | None = None  # (N, k) purified labels per pass (-1 = not run); None for one pass

    @property
    def flagged(self) -> np.ndarray:
        return (self.labels != self.pred_orig) & (self.labels >= 0) & (self.pred_orig >= 0)


Steps = Generator["PurifyStep | QueryStep", Any, Decision]


class _Failures:
    def __init__(self, n: int) -> None:
        self.errors: list[str | None] = [None] * n
        self.retryable = np.zeros(n, bool)

    def add(self, rows: np.ndarray, answer: Answer, offset: int = 0) -> None:
        for local, row in enumerate(rows):
            e = answer.errors[offset + local]
            if e is not None and self.errors[row] is None:
                self.errors[row] = f"black box: {e}"
                self.retryable[row] = bool(answer.retryable[offset + local])

    @property
    def failed(self) -> np.ndarray:
        return np.array([e is not None for e in self.errors], bool)


def one_pass_steps(images: np.ndarray, seed: int) -> Steps:
    """A single-pass method's rounds: purify every row once, ask about the original and the purified image in one
    query. flag_score: how much purification took from the original answer's probability (or 1 for a flip, 0
    otherwise, when the black box gives labels only)."""
    n = len(images)
    out, nfe = yield PurifyStep(np.arange(n), seed)
    a = Answer.of((yield QueryStep(np.concatenate([images, out]))), 2 * n)
    fail = _Failures(n)
    rows = np.arange(n)
    fail.add(rows, a)
    fail.add(rows, a, offset=n)
    pred_orig, pred_pur = a.labels[:n], a.labels[n:]
    if a.scores is not None:
        flag = a.own_score[:n] - a.score_of(pred_orig, offset=n)
    else:
        flag = (pred_orig != pred_pur).astype(np.float32)
    bad = fail.failed
    return Decision(images=out, pred_orig=np.where(bad, -1, pred_orig), score_orig=a.own_score[:n],
                    labels=np.where(bad, -1, pred_pur), score_purified=a.own_score[n:],
                    flag_score=np.where(bad, np.nan, flag).astype(np.float32),
                    nfe=np.asarray(nfe, np.float64), errors=fail.errors, retryable=fail.retryable)


def drive(steps: Steps, images: np.ndarray, keys: Sequence[str], purify: Purifier, classify: Classify) -> Decision:
    """Run rounds in this thread: purifier calls inline, queries through `classify`. The pipeline's purify stage
    drives the same rounds asynchronously (pipeline/stages.py), so both decide alike."""
    answer: Any = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value
        if isinstance(step, PurifyStep):
            res = purify(images[step.rows], [keys[i] for i in step.rows], step.seed)
            answer = (res.uint8(), res.nfe.numpy())
        else:
            answer = classify(step.images)


class Cascade:
    """Wraps a base purifier: `k` passes at most per image, escalated by `escalate` (`flip` or `always`); the
    original label casts `original_votes` ballots where the black box's probability for it is below the gate's
    threshold: `original_below` (None: always), or with `original_quantile` the threshold `calibrate` measures on
    the first `calibration_rows` images of the job (`original_below`, if given too, is taken as that measurement),
    and only while the passes give the original label a mean probability of at least `original_support`; `pick`
    chooses among the classes the passes voted where they out-vote the original. Constructed directly, the gate is
    fixed; `build_purifier` applies the method's defaults (DEFAULTS), which measure it."""

    name = "cascade"

    def __init__(self, base: Purifier, k: int = DEFAULTS["k"], escalate: str = DEFAULTS["escalate"],
                 original_votes: int | None = None,
                 original_below: float | None = DEFAULTS["original_below"],
                 original_quantile: float | None = None,
                 calibration_rows: int = DEFAULTS["calibration_rows"],
                 original_support: float = DEFAULTS["original_support"], pick: str = DEFAULTS["pick"]) -> None:
        if not 1 <= int(k) <= K_MAX:
            raise ValueError(f"k must be in [1, {K_MAX}], got {k}")
        if escalate not in ESCALATE:
            raise ValueError(f"escalate must be one of {ESCALATE}, got {escalate!r}")
        if original_votes is None:  # a vote of fewer passes than the default ballots gets as many ballots as passes
            original_votes = min(DEFAULTS["original_votes"], int(k))
        if not 0 <= int(original_votes) <= k:
            raise ValueError(f"original_votes must be in [0, k={k}], got {original_votes}")
        if original_quantile is not None and not 0.0 < float(original_quantile) < 1.0:
            raise ValueError(f"original_quantile must be in (0, 1) or null, got {original_quantile}")
        lowest = 0.0 if original_quantile is not None else 1e-12  # a measured gate may be shut (label-only)
        if original_below is not None and not lowest <= float(original_below) <= 1.0:
            raise ValueError(f"original_below must be in (0, 1] (a probability) or null, got {original_below}")
        if not 0.0 <= float(original_support) <= 1.0:
            raise ValueError(f"original_support must be in [0, 1] (a probability; 0 = off), got {original_support}")
        if pick not in PICK:
            raise ValueError(f"pick must be one of {PICK}, got {pick!r}")
        if not 1 <= int(calibration_rows) <= 100_000:
            raise ValueError(f"calibration_rows must be in [1, 100000], got {calibration_rows}")
        self.base, self.k, self.escalate, self.pick = base, int(k), escalate, pick
        self.original_votes = int(original_votes)
        self.original_support = float(original_support)
        self.original_quantile = None if original_quantile is None else float(original_quantile)
        self.calibration_rows = int(calibration_rows)
        self.original_below = None if original_below is None else float(original_below)

    @property
    def needs_calibration(self) -> bool:
        """A measured gate not measured yet: the rounds refuse to run until `calibrate`."""
        return self.original_quantile is not None and self.original_votes > 0 and self.original_below is None

    def calibrate(self, top_scores: np.ndarray | None) -> float:
        """Measure the gate on the black box's top probabilities for the job's first images; returns the threshold."""
        if self.original_quantile is None:
            raise ValueError("calibrate() needs original_quantile")
        self.original_below = gate_threshold(top_scores, self.original_quantile)
        return self.original_below

    def params(self) -> dict[str, Any]:
        out = {"base": self.base.name, **self.base.params(), "k": self.k, "escalate": self.escalate,
               "original_votes": self.original_votes, "original_below": self.original_below,
               "original_support": self.original_support, "pick": self.pick}
        if self.original_quantile is not None:
            out.update(original_quantile=self.original_quantile, calibration_rows=self.calibration_rows)
        return out

    def ballots(self, pred_orig: np.ndarray, score_orig: np.ndarray | None,
                support: np.ndarray | None = None) -> np.ndarray:
        """The original label's ballots; `support`: the passes' mean probability for it so far (None: not asked)."""
        if self.needs_calibration:
            raise RuntimeError("the vote's gate is measured per job (original_quantile): call calibrate() first")
        below = self.original_below
        if support is not None and score_orig is not None and self.original_support > 0:
            score_orig = supported(score_orig, support, self.original_support)
            if below is None:  # a gate that always opens still asks for the passes' support
                below = np.inf
        return original_ballots(pred_orig, score_orig, self.original_votes, below)

    @property
    def nominal_nfe(self) -> float:
        # Per image when nothing escalates (flip) or the first passes agree (always: a majority of k, after which the
        # passes left cannot overturn it); at most k times the base.
        return self.base.nominal_nfe * (1 if self.escalate == "flip" else self.k // 2 + 1)

    def steps(self, images: np.ndarray, seed: int) -> Steps:
        """The vote's rounds for one batch: pass 0 on every row and one query for the originals and pass 0; then,
        per extra pass j, the rows whose vote is still open (`needs_pass`) get pass j and a query. A row whose
        query fails leaves the vote with its reason (it never votes with fewer passes than the rule asks)."""
        n = len(images)
        out, nfe0 = yield PurifyStep(np.arange(n), seed)
        a = Answer.of((yield QueryStep(np.concatenate([images, out]))), 2 * n)
        fail = _Failures(n)
        fail.add(np.arange(n), a)
        fail.add(np.arange(n), a, offset=n)
        pred_orig, score_orig = a.labels[:n], a.own_score[:n]
        scored = a.scores is not None
        support = _Support(a.score_of(pred_orig, offset=n))
        summed = _Summed(a.scores[n:] if scored and self.pick == "probability" else None)
        ballots = self.ballots(pred_orig, score_orig if scored else None, support.mean)
        votes = np.full((n, self.k), -1, dtype=np.int64)
        votes[:, 0] = a.labels[n:]
        passes = np.zeros((n, self.k, *out.shape[1:]), dtype=np.uint8)
        passes[:, 0] = out
        nfe = np.asarray(nfe0, np.float64).copy()
        for j, s in enumerate(escalation_seeds(seed, self.k), start=1):
            rows = np.flatnonzero(~fail.failed & needs_pass(pred_orig, votes[:, :j], self.k, self.escalate, ballots))
            if not rows.size:
                continue
            imgs, extra = yield PurifyStep(rows, s)
            passes[rows, j] = imgs
            nfe[rows] += extra
            aj = Answer.of((yield QueryStep(imgs)), len(rows))
            votes[rows, j] = aj.labels
            fail.add(rows, aj)
            support.add(rows, aj.score_of(pred_orig[rows]))
            summed.add(rows, aj.scores)
            ballots = self.ballots(pred_orig, score_orig if scored else None, support.mean)
        out = finish_cascade(pred_orig, votes, passes, nfe, ballots, summed.total)
        bad = fail.failed
        first_score = a.own_score[n:]
        escalated = (votes[:, 1:] >= 0).any(1)
        return Decision(images=out.images, pred_orig=np.where(bad, -1, pred_orig), score_orig=score_orig,
                        labels=np.where(bad, -1, out.labels),
                        # the voted image's own score is not queried again; pass 0's no longer describes it
                        score_purified=np.where(escalated, np.nan, first_score).astype(np.float32),
                        flag_score=np.where(bad, np.nan, out.flag_score).astype(np.float32), nfe=nfe,
                        errors=fail.errors, retryable=fail.retryable, votes=votes)

    def run(self, images: np.ndarray | torch.Tensor, keys: Sequence[str], seed: int,
            classify: Classify) -> Decision:
        images = np.asarray(images)
        return drive(self.steps(images, seed), images, keys, self.base, classify)


class _Support:
    """Per row, the mean over the passes run so far of the black box's probability for the original label (passes
    answered without scores left out; NaN while none had one)."""

    def __init__(self, first: np.ndarray) -> None:
        known = ~np.isnan(first)
        self.total = np.where(known, first, 0.0).astype(np.float64)
        self.count = known.astype(np.int64)

    def add(self, rows: np.ndarray, scores: np.ndarray) -> None:
        known = ~np.isnan(scores)
        self.total[rows] += np.where(known, scores, 0.0)
        self.count[rows] += known

    @property
    def mean(self) -> np.ndarray:
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan).astype(np.float32)


def by_probability(labels: np.ndarray, pred_orig: np.ndarray, votes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Where the vote went against the original label, the class the passes voted (other than the original) with the
    most probability summed over the passes (`scores` (N, K); a row with NaN keeps its label). Ties go to the lower
    class id."""
    out = labels.copy()
    known = ~np.isnan(scores).any(1)
    for i in np.flatnonzero((labels >= 0) & (labels != pred_orig) & known):
        row = votes[i]
        cand = np.unique(row[(row >= 0) & (row != pred_orig[i]) & (row < scores.shape[1])])
        if cand.size:
            out[i] = cand[np.argmax(scores[i, cand])]
    return out


class _Summed:
    """Per row, the black box's probabilities summed over the passes run so far (N, K); None without scores. A row
    with a pass answered without scores, or with another number of classes, becomes NaN: it picks by votes."""

    def __init__(self, first: np.ndarray | None) -> None:
        self.total = None if first is None else np.asarray(first, np.float64).copy()

    def add(self, rows: np.ndarray, scores: np.ndarray | None) -> None:
        if self.total is None:
            return
        if scores is None or scores.shape[1] != self.total.shape[1]:
            self.total[rows] = np.nan
        else:
            self.total[rows] += scores


@dataclass
class CascadeOutcome:
    images: np.ndarray  # uint8 (N, C, H, W): per row, the first pass that voted the winner (pass 0 where the original
    # label won on its own ballots)
    labels: np.ndarray  # the defended labels
    flag_score: np.ndarray  # share of purified votes that disagree with the original label


def finish_cascade(pred_orig: np.ndarray, votes: np.ndarray, passes: np.ndarray, nfe: np.ndarray,
                   ballots: np.ndarray | None = None, scores: np.ndarray | None = None) -> CascadeOutcome:
    """Vote and pick the output image. votes (N, m) with -1 for passes not run; passes (N, m, C, H, W) uint8;
    ballots: the original label's (`original_ballots`), or None; scores: the passes' summed probabilities (N, K), NaN
    rows unknown (`by_probability`), or None to pick by votes."""
    labels, _ = majority(_pool(votes, ballots))
    if scores is not None:
        labels = by_probability(labels, pred_orig, votes, scores)
    valid = votes >= 0
    disagree = ((votes != pred_orig[:, None]) & valid).sum(1) / np.maximum(valid.sum(1), 1)
    pick = np.argmax(votes == labels[:, None], axis=1)  # first pass that voted the winner (0 if none did)
    images = passes[np.arange(len(labels)), pick]
    return CascadeOutcome(images=images, labels=labels, flag_score=disagree.astype(np.float32))
