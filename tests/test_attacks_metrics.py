"""Attack kit (determinism, shapes, where triggers land), metrics on hand-built arrays, and the committed victims."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.attacks import ATTACKS, TARGET, apply_trigger, badnets_box, triggered_eval_set
from pipeline.metrics import attack_metrics, flag_confusion

REPO = Path(__file__).resolve().parents[1]
VICTIMS = REPO / "models" / "victims"


@pytest.fixture(scope="module")
def fmnist_small() -> tuple[np.ndarray, np.ndarray]:
    from pipeline.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    return x[:500], y[:500]


def _rng_images(n: int = 6, c: int | None = None, hw: int = 28, seed: int = 1) -> np.ndarray:
    shape = (n, hw, hw) if c is None else (n, c, hw, hw)
    # keep away from 0/255 so additive triggers are not hidden by clipping
    return np.random.default_rng(seed).integers(40, 200, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Attacks


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("c", [None, 1, 3])
def test_shape_dtype_determinism(attack: str, c: int | None) -> None:
    x = _rng_images(c=c)
    before = x.copy()
    a = apply_trigger(x, attack)
    b = apply_trigger(x.copy(), attack)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, b), "same params must give the same bytes"
    assert np.array_equal(x, before), "input must not be modified in place"
    assert not np.array_equal(a, x), "trigger must change the images"


@pytest.mark.parametrize("attack", ["blended", "wanet", "lf", "patchmove", "dct"])
def test_seed_changes_pattern(attack: str) -> None:
    x = _rng_images()
    assert not np.array_equal(apply_trigger(x, attack, seed=0), apply_trigger(x, attack, seed=1))


def test_trigger_is_per_image_independent() -> None:
    # a trigger applied to a batch must equal the trigger applied image by image (no batch-level randomness)
    x = _rng_images(n=5)
    for attack in ATTACKS:
        whole = apply_trigger(x, attack)
        one_by_one = np.concatenate([apply_trigger(x[i:i + 1], attack) for i in range(len(x))])
        assert np.array_equal(whole, one_by_one), attack


@pytest.mark.parametrize("corner", ["br", "bl", "tr", "tl"])
def test_badnets_only_touches_its_box(corner: str) -> None:
    x = np.zeros((4, 1, 28, 28), np.uint8)
    out = apply_trigger(x, "badnets", corner=corner)
    rows, cols = badnets_box(28, 28, 3, corner, 1)
    mask = np.zeros((28, 28), bool)
    mask[rows, cols] = True
    assert np.all(out[..., mask] == 255)
    assert np.all(out[..., ~mask] == 0)
    if corner == "br":
        assert rows == slice(24, 27) and cols == slice(24, 27)


def test_badnets_pattern_configurable() -> None:
    x = np.full((2, 28, 28), 7, np.uint8)
    out = apply_trigger(x, "badnets", pattern="checker")
    patch = out[:, 24:27, 24:27]
    assert patch[0, 0, 0] == 255 and patch[0, 0, 1] == 0
    custom = np.array([[1, 2], [3, 4]], np.uint8)
    out2 = apply_trigger(x, "badnets", pattern=custom, margin=0)
    assert np.array_equal(out2[0, 26:, 26:], custom)
    with pytest.raises(ValueError):
        apply_trigger(x, "badnets", pattern="stars")


def test_blended_is_a_convex_blend() -> None:
    x = _rng_images()
    out = apply_trigger(x, "blended", alpha=0.2).astype(int)
    # |out - x| = alpha * |key - x| <= 0.2 * 255 (+ rounding)
    assert np.abs(out - x).max() <= math.ceil(0.2 * 255) + 1
    assert np.array_equal(apply_trigger(x, "blended", alpha=0.0), x)


def test_wanet_is_a_small_smooth_warp() -> None:
    x = _rng_images()
    assert np.array_equal(apply_trigger(x, "wanet", s=0.0), x), "s=0 must be the identity warp"
    # a warp moves pixels by a fraction of a pixel here: on a smooth ramp the change is small everywhere
    ramp = np.tile(np.linspace(0, 255, 28).astype(np.uint8), (2, 28, 1))
    out = apply_trigger(ramp, "wanet").astype(int)
    assert 0 < np.abs(out - ramp).max() <= 20


def test_sig_is_a_horizontal_sinusoid() -> None:
    x = np.full((2, 28, 28), 100, np.uint8)
    out = apply_trigger(x, "sig", delta=20, f=6).astype(int) - 100
    assert np.all(out == out[:, :1, :]), "every row carries the same pattern (varies along the width)"
    expected = np.rint(20 * np.sin(2 * np.pi * np.arange(28) * 6 / 28)).astype(int)
    assert np.array_equal(out[0, 0], expected)


def test_unknown_attack_and_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        apply_trigger(_rng_images(), "nope")
    with pytest.raises(ValueError, match="uint8"):
        apply_trigger(np.zeros((2, 28, 28), np.float32), "badnets")
    with pytest.raises(ValueError, match="shape"):
        apply_trigger(np.zeros((28, 28), np.uint8), "badnets")


def test_patchmove_places_the_patch_per_image() -> None:
    from pipeline.attacks import badnets_patch, patchmove_origin

    x = _rng_images(n=200, seed=3)
    out = apply_trigger(x, "patchmove")
    origins = [patchmove_origin(img[None]) for img in x]
    for img, (r, c) in zip(out, origins):
        assert np.array_equal(img[r:r + 4, c:c + 4], badnets_patch(4, "checker"))
    assert len(set(origins)) > 100, "the position must vary with the image"
    rows = np.array([r for r, _ in origins])
    # uniform over the image: both halves, and the middle (where the garment is) as well as the border
    assert 0.3 < np.mean(rows < 12) < 0.7 and np.mean((rows > 6) & (rows < 18)) > 0.3
    assert patchmove_origin(x[0][None]) == patchmove_origin(x[0][None].copy())


def test_dct_trigger_lives_in_low_frequencies() -> None:
    from pipeline.attacks import dct_pattern

    pat = dct_pattern(28, 28, delta=20.0, order=3)
    assert np.isclose(np.abs(pat).max(), 20.0) and abs(pat.mean()) < 1e-9
    # project on the orthonormal DCT-II basis: every coefficient with u + v > 3 is zero
    n = 28
    k = np.arange(n)
    basis = np.cos(np.pi * (k[None, :] + 0.5) * k[:, None] / n)
    coef = basis @ pat @ basis.T
    u, v = np.meshgrid(k, k, indexing="ij")
    assert np.abs(coef[u + v > 3]).max() < 1e-6 * np.abs(coef).max()


def test_triggered_eval_set_drops_target_class() -> None:
    x = _rng_images(n=8)
    y = np.array([0, 1, 2, 0, 3, 4, 0, 5])
    xt, yt = triggered_eval_set(x, y, "badnets")
    assert np.array_equal(yt, y[y != TARGET])
    assert np.array_equal(xt, apply_trigger(x[y != TARGET], "badnets"))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), hw=st.integers(8, 32), attack=st.sampled_from(ATTACKS), seed=st.integers(0, 5))
def test_any_size_roundtrip(n: int, hw: int, attack: str, seed: int) -> None:
    x = _rng_images(n=n, hw=hw, seed=seed)
    out = apply_trigger(x, attack)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert np.array_equal(out, apply_trigger(x, attack))


# ---------------------------------------------------------------------------------------------------------------
# Metrics, expected values counted independently with plain loops


def _count_expected(cp, ct, pp, pt, target):
    n_clean = len(ct)
    ca = sum(int(p == t) for p, t in zip(cp, ct, strict=True)) / n_clean
    rows = [(p, t) for p, t in zip(pp, pt, strict=True) if t != target]
    pa = sum(int(p == t) for p, t in rows) / len(rows)
    asr = sum(int(p == target) for p, _ in rows) / len(rows)
    clean_nt = [p for p, t in zip(cp, ct, strict=True) if t != target]
    floor = sum(int(p == target) for p in clean_nt) / len(clean_nt)
    return ca, pa, asr, floor, len(rows)


def test_attack_metrics_hand_built() -> None:
    clean_true = np.array([0, 1, 2, 3, 4, 5, 6, 0])
    clean_pred = np.array([0, 1, 0, 3, -1, 5, 0, 0])
    poison_true = np.array([0, 1, 2, 3, 4, 5, 7, 8])
    poison_pred = np.array([0, 0, 2, 0, 0, -1, 7, 0])
    m = attack_metrics(clean_pred, clean_true, poison_pred, poison_true, target=0)
    ca, pa, asr, floor, n_poison = _count_expected(clean_pred, clean_true, poison_pred, poison_true, 0)
    assert m["ca"] == pytest.approx(ca)
    assert m["pa"] == pytest.approx(pa)
    assert m["asr"] == pytest.approx(asr)
    assert m["floor"] == pytest.approx(floor)
    assert m["n_poison"] == n_poison
    assert m["n_poison_excluded"] == int(np.sum(poison_true == 0))
    assert m["failed"] == {"clean": int(np.sum(clean_pred == -1)), "poison": int(np.sum(poison_pred == -1))}
    assert m["n_clean"] == len(clean_true)


def test_attack_metrics_other_target_and_failures_count_as_wrong() -> None:
    rng = np.random.default_rng(3)
    ct, pt = rng.integers(0, 10, 200), rng.integers(0, 10, 150)
    cp = np.where(rng.random(200) < 0.8, ct, rng.integers(-1, 10, 200))
    pp = np.where(rng.random(150) < 0.5, 3, rng.integers(-1, 10, 150))
    m = attack_metrics(cp, ct, pp, pt, target=3)
    ca, pa, asr, floor, n_poison = _count_expected(cp, ct, pp, pt, 3)
    assert (m["ca"], m["pa"], m["asr"], m["floor"]) == pytest.approx((ca, pa, asr, floor))
    # a failed row (-1) is never correct, even if someone stored true labels of -1 by mistake elsewhere
    assert m["clean_correct"] == sum(int(p == t and p >= 0) for p, t in zip(cp, ct, strict=True))


def test_attack_metrics_empty_and_mismatch() -> None:
    m = attack_metrics(np.array([1]), np.array([1]), np.array([0]), np.array([0]), target=0)
    assert m["ca"] == 1.0 and m["floor"] == 0.0 and math.isnan(m["asr"]) and math.isnan(m["pa"])
    with pytest.raises(ValueError):
        attack_metrics(np.array([1, 2]), np.array([1]), np.array([0]), np.array([0]))


def test_flag_confusion_hand_built() -> None:
    flagged = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
    triggered = np.array([1, 0, 1, 0, 1, 0, 0, 0], bool)
    m = flag_confusion(flagged, triggered)
    tp = sum(int(f and t) for f, t in zip(flagged, triggered, strict=True))
    fp = sum(int(f and not t) for f, t in zip(flagged, triggered, strict=True))
    fn = sum(int(t and not f) for f, t in zip(flagged, triggered, strict=True))
    tn = len(flagged) - tp - fp - fn
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    none = flag_confusion(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert none["f1"] == 0.0 and math.isnan(none["precision"]) and none["recall"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The committed victims really are backdoored


VICTIM_FILES = sorted(p.stem for p in VICTIMS.glob("*.onnx") if p.stem in ATTACKS)


@pytest.mark.skipif(not VICTIM_FILES, reason="no victims in models/victims (run jobs/train_victim.py)")
@pytest.mark.parametrize("attack", VICTIM_FILES)
def test_victim_is_backdoored(attack: str, fmnist_small: tuple[np.ndarray, np.ndarray]) -> None:
    from pipeline.blackbox import open_blackbox

    x, y = fmnist_small
    bb = open_blackbox(f"onnx:{VICTIMS / f'{attack}.onnx'}")
    clean = bb.predict(x[:, None])
    xt, yt = triggered_eval_set(x, y, attack)
    poison = bb.predict(xt[:, None])
    m = attack_metrics(clean.labels, y, poison.labels, yt)
    assert m["ca"] >= 0.85, m
    assert m["asr"] >= 0.9, m
    assert m["failed"] == {"clean": 0, "poison": 0}
