"""Purification core on a tiny random UNet: the properties each method promises, independent of training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.bench import GRID
from pipeline.blackbox.base import Prediction
from pipeline.purify import build_purifier
from pipeline.purify.batching import CPU_CHUNK
from pipeline.purify.cascade import (
    Cascade,
    by_probability,
    escalation_seeds,
    majority,
    needs_pass,
    original_ballots,
    supported,
)
from pipeline.purify.degradations import parse_degradation
from pipeline.purify.filters import unsharp_mask
from pipeline.purify.guided import Guided
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampdetox import LocalRepair, SampDetox
from pipeline.purify.sampling import predict_eps, state_grid
from pipeline.purify.sdedit import SDEdit
from pipeline.purify.ssim import ssim_map
from pipeline.purify.zip import ZIP
from pipeline.zoo import DEFAULT_LABEL


def tiny_model(channels: int = 1, size: int = 16) -> DiffusionModel:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4).eval()
    sched = DDPMScheduler(num_train_timesteps=1000)
    return DiffusionModel(unet, sched.alphas_cumprod.double(), size, channels, "tiny")


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return tiny_model()


def batch(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


KEYS7 = [f"img-{i}" for i in range(7)]


@pytest.mark.parametrize("method,params", [
    ("sdedit", {"t_start": 100, "steps": 4}),
    ("zip", {"degradation": "pool2", "t_start": 100, "steps": 4}),
    ("sampdetox", {"t1": 10, "t2": 40, "steps1": 3, "steps2": 5}),
    ("repair", {"t1": 100, "t2": 100, "steps1": 3, "steps2": 4}),
    ("guided", {"t_start": 100, "steps": 4, "locate_steps": 2, "guide_steps": 2}),
])
def test_same_result_alone_or_in_a_batch(model, method, params):
    p = build_purifier(method, model, params)
    imgs = batch(7)
    full = p(imgs, KEYS7, seed=3)
    alone = p(imgs[4:5], KEYS7[4:5], seed=3)
    assert torch.allclose(full.images[4], alone.images[0], atol=1e-5)
    assert np.array_equal(full.uint8()[4], alone.uint8()[0])
    assert full.nfe[4] == alone.nfe[0]
    # A different seed or key gives different noise.
    other = p(imgs[4:5], ["img-x"], seed=3)
    assert not torch.allclose(other.images[0], alone.images[0])


def test_cpu_unet_calls_go_in_chunks_with_the_same_answer(model):
    x = torch.from_numpy(batch(2 * CPU_CHUNK + 3)).float() / 127.5 - 1
    calls = []
    hook = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        eps = predict_eps(model, x, 50)
    finally:
        hook.remove()
    assert calls == [CPU_CHUNK] * 3  # the short last chunk is padded: every call has the same size
    with torch.no_grad():
        whole = model.unet(x, torch.full((len(x),), 49)).sample
    assert torch.allclose(eps, whole, atol=1e-5)


@pytest.mark.parametrize("method,params", [
    ("guided", {}),
    ("sdedit", {"t_start": 150, "steps": 3, "sharpen": 1.0}),
    ("sampdetox", {"t1": 20, "t2": 60, "steps1": 2, "steps2": 3}),
    ("zip", {"degradation": "pool2", "t_start": 100, "steps": 3}),
])
def test_a_rows_image_is_bit_exact_whatever_its_batch(method, params):
    """The shipped model on real images: a row purified alone, in a short batch or in a long one gives the same
    floats, so the same uint8 image (CPU convolutions pick their kernels by batch size; see purify/batching.py)."""
    from pipeline.datasets import load_fashion_mnist
    from pipeline.purify import load_model

    images = load_fashion_mnist("test")[0][:21, None]
    keys = [f"k{i}" for i in range(21)]
    p = build_purifier(method, load_model("fmnist-tiny", "cpu"), params)
    with torch.inference_mode():
        full = p(images, keys, seed=5).images
        for rows in (slice(0, 1), slice(0, 5), slice(3, 20), slice(9, 10)):
            assert torch.equal(p(images[rows], keys[rows], seed=5).images, full[rows]), (method, rows)


def count_rows(calls: list[int]):
    """A UNet forward hook that records how many images a call evaluated: a short CPU call is padded to a fixed size
    by repeating its last row (purify/batching.py), and the padding is no image's NFE."""
    return lambda m, i, o: calls.append(len(torch.unique(i[0].flatten(1), dim=0)))


def test_nfe_counts_exact(model):
    imgs = batch(3)
    assert SDEdit(model, t_start=200, steps=7)(imgs, ["a", "b", "c"]).nfe.tolist() == [7, 7, 7]
    assert ZIP(model, t_start=300, steps=5)(imgs, ["a", "b", "c"]).nfe.tolist() == [5, 5, 5]
    calls = []
    hook = model.unet.register_forward_hook(count_rows(calls))
    try:
        res = Guided(model, t_start=200, steps=5, locate_steps=2)(imgs, ["a", "b", "c"])
    finally:
        hook.remove()
    assert res.nfe.tolist() == [7, 7, 7] and sum(calls) == 21
    calls = []
    hook = model.unet.register_forward_hook(count_rows(calls))
    try:
        res = SampDetox(model, t1=8, t2=30, steps1=4, steps2=6)(imgs, ["a", "b", "c"])
    finally:
        hook.remove()
    # Every UNet row evaluated is counted against exactly one image.
    assert int(res.nfe.sum()) == sum(calls)
    assert (res.nfe >= 4).all() and (res.nfe <= 10).all()


@pytest.mark.parametrize("deg", ["pool2", "pool4", "gray+pool2"])
def test_zip_output_is_consistent_with_the_measurement(deg):
    channels = 3 if "gray" in deg else 1
    m = tiny_model(channels)
    imgs = np.random.default_rng(1).integers(96, 160, (5, channels, 16, 16), dtype=np.uint8)
    z = ZIP(m, degradation=deg, t_start=300, steps=4)
    op = parse_degradation(deg)
    x = torch.as_tensor(imgs).float() / 127.5 - 1
    # The DDNM projection itself is exact: A(project(anything)) = A(x).
    project, start = z.projection(x)
    anything = torch.randn_like(x)
    assert torch.allclose(op(project(anything)), op(x), atol=1e-5)
    assert torch.allclose(op(start), op(x), atol=1e-5)
    # End to end, exact up to the final clamp to [-1, 1] (rarely active for mid-range images).
    out = z(imgs, [str(i) for i in range(5)]).images
    assert (op(out) - op(x)).abs().mean() < 3e-2
    assert (op(out) - op(x)).abs().mean() < 0.1 * (op(torch.rand_like(x) * 2 - 1) - op(x)).abs().mean()


def test_guided_trusts_only_blocks_the_locator_left_alone(model):
    g = Guided(model, pool=2, tau=0.3)
    x = torch.full((1, 1, 16, 16), -1.0)
    x[..., 4:10, 3:12] = 0.4  # a garment
    located = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    patched = x.clone()
    patched[..., 12:15, 12:15] = 1.0  # a bright patch the locator removed
    mask = g.trusted_blocks(patched, located)[0, 0]
    assert mask[12:15, 12:15].sum() == 0 and mask[10:12, 10:12].sum() == 0  # the patch and its neighbour blocks
    assert mask[:8].min() == 1 and mask[:, :8].min() == 1  # everything else, the garment included


def test_guided_restarts_from_the_locator_only_around_a_block_it_moved_far(model):
    x = torch.full((1, 1, 16, 16), -1.0)
    x[..., 4:10, 3:12] = 0.4  # a garment
    located = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    patched = x.clone()
    patched[..., 12:15, 12:15] = 1.0  # a bright patch the locator removed
    located[..., 4:6, 4:6] += 0.5  # texture the locator moved by less than restart_tau
    located[..., 0:2, 0:2] += 1.0  # moved by more than restart_tau, but no core (> restart_core) near it
    start = Guided(model, pool=2, restart_tau=0.8, restart_core=1.2).start_point(patched, located)
    far = torch.zeros_like(x, dtype=torch.bool)
    far[..., 10:16, 10:16] = True  # the patch's blocks and their neighbours
    assert torch.equal(start[far], located[far]) and torch.equal(start[~far], patched[~far])
    assert torch.equal(Guided(model, restart_tau=None).start_point(patched, located), patched)
    imgs = batch(2)
    with_restart = Guided(model, t_start=300, steps=3, restart_tau=0.0, restart_core=0.0)(imgs, ["a", "b"]).images
    without = Guided(model, t_start=300, steps=3, restart_tau=None)(imgs, ["a", "b"]).images
    assert not torch.equal(with_restart, without)  # the knob reaches the sampler
    for bad in (-0.1, 2.5):
        with pytest.raises(ValueError, match="restart_tau"):
            Guided(model, restart_tau=bad)
    with pytest.raises(ValueError, match="restart_core"):
        Guided(model, restart_tau=0.8, restart_core=0.5)


def test_quadratic_spacing_shrinks_the_steps_towards_the_clean_end(model):
    assert state_grid(300, 4) == [300, 225, 150, 75, 0]
    assert state_grid(300, 4, "quadratic") == [300, 169, 75, 19, 0]  # DDIM's t_start ((S - k) / S)^2
    for t_start, steps in ((10, 8), (5, 5), (1, 1), (1000, 50)):
        grid = state_grid(t_start, steps, "quadratic")
        assert grid[0] == t_start and grid[-1] == 0 and len(grid) == steps + 1
        assert all(a > b for a, b in zip(grid, grid[1:]))  # never a repeated state, however short the run
        gaps = np.diff(grid[::-1])
        assert (gaps[1:] >= gaps[:-1]).all()  # the steps never grow towards the clean end
    with pytest.raises(ValueError, match="spacing"):
        state_grid(300, 4, "cosine")
    with pytest.raises(ValueError, match="spacing"):
        Guided(model, spacing="log")
    imgs = batch(2)
    linear = Guided(model, t_start=300, steps=4)
    quad = Guided(model, t_start=300, steps=4, spacing="quadratic")
    out = quad(imgs, ["a", "b"])
    assert not torch.equal(out.images, linear(imgs, ["a", "b"]).images)  # the knob reaches the sampler
    assert out.nfe.tolist() == [6, 6]  # the same cost
    assert "spacing" not in linear.params() and quad.params()["spacing"] == "quadratic"


def test_guided_projection_holds_the_pool_and_switches_off(model):
    imgs = np.random.default_rng(1).integers(96, 160, (4, 1, 16, 16), dtype=np.uint8)
    keys = [str(i) for i in range(4)]
    x = torch.as_tensor(imgs).float() / 127.5 - 1
    # Every block trusted and every step guided: the output keeps the input's 2x2 means (ZIP's consistency, up to
    # the final clamp to [-1, 1]).
    out = Guided(model, t_start=300, steps=4, tau=2.0, guide_steps=4, sharpen=0.0)(imgs, keys).images
    assert (F.avg_pool2d(out, 2) - F.avg_pool2d(x, 2)).abs().mean() < 3e-2
    # No block trusted, or no step guided: the pool is free again.
    for kw in ({"tau": 0.0, "guide_steps": 4}, {"tau": 2.0, "guide_steps": 0}):
        free = Guided(model, t_start=300, steps=4, sharpen=0.0, **kw)(imgs, keys).images
        assert (F.avg_pool2d(free, 2) - F.avg_pool2d(x, 2)).abs().mean() > 0.1


def test_zip_blur_consistency_is_approximate(model):
    imgs = batch(3)
    out = ZIP(model, degradation="blur1", t_start=300, steps=4)(imgs, ["a", "b", "c"]).images
    op = parse_degradation("blur1")
    x = torch.as_tensor(imgs).float() / 127.5 - 1
    rand = torch.rand_like(x) * 2 - 1
    assert (op(out) - op(x)).abs().mean() < 0.5 * (op(rand) - op(x)).abs().mean()


def test_sampdetox_noise_map_high_on_a_changed_patch_low_elsewhere(model):
    x = torch.full((1, 1, 16, 16), -0.5)
    x_bar = x.clone()
    x[..., 11:14, 11:14] = 1.0  # a bright 3x3 patch that stage 1 removed (x_bar keeps the background)
    sd = SampDetox(model, t1=20, t2=120)
    lv = sd.noise_levels(x, x_bar)[0, 0]
    assert lv[11:14, 11:14].float().mean() > 80
    assert lv[:6, :6].max() == 0
    assert lv.max() <= 120


def test_sampdetox_map_is_rescaled_per_image_by_its_own_min_and_max(model):
    # The public code's S_hat = (S - min S) / (max S - min S): the most-changed pixel of every image joins at t2,
    # however little the first pass changed it; clipping only (repair's choice) leaves a faint change faint.
    x = torch.full((3, 1, 16, 16), -0.5)
    x_bar = x.clone()
    x_bar[0, :, 4:8, 4:8] += 0.05  # a faint change
    x_bar[1, :, 4:8, 4:8] += 1.0  # a strong one
    minmax = SampDetox(model, t1=20, t2=120).noise_levels(x, x_bar)
    clipped = SampDetox(model, t1=20, t2=120, ssim_norm="clip").noise_levels(x, x_bar)
    assert minmax[0].max() == minmax[1].max() == 120 and minmax[0, 0, 0, 15] == 0
    assert clipped[0].max() < 30 < clipped[1].max()
    assert minmax[2].max() == clipped[2].max() == 0  # nothing changed: no strong noise (not a division by zero)
    assert LocalRepair(model).ssim_norm == "clip"
    with pytest.raises(ValueError, match="ssim_norm"):
        SampDetox(model, ssim_norm="zscore")


class FixedMap(LocalRepair):
    """LocalRepair with a given level map, to check what stage 2 does with it independently of stage 1."""

    def __init__(self, model, levels: torch.Tensor, **kw) -> None:
        super().__init__(model, **kw)
        self.fixed = levels

    def noise_levels(self, x, x_bar):
        return self.fixed.expand(x.shape[0], 1, *x.shape[2:]).clone()


def test_repair_changes_only_the_located_region_and_counts_nfe(model):
    levels = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    levels[..., 10:14, 10:14] = 300
    imgs = batch(3)
    rep = FixedMap(model, levels, t1=50, t2=300, steps1=2, steps2=6)
    calls = []
    hook = model.unet.register_forward_hook(count_rows(calls))
    try:
        res = rep(imgs, ["a", "b", "c"])
    finally:
        hook.remove()
    out = res.uint8()
    outside = np.ones((16, 16), bool)
    outside[10:14, 10:14] = False
    # Stage 2 starts from the input: pixels the map leaves at level 0 come back bit-exact.
    assert np.array_equal(out[:, :, outside], imgs[:, :, outside])
    assert (out[:, :, 10:14, 10:14] != imgs[:, :, 10:14, 10:14]).mean() > 0.5
    assert res.nfe.tolist() == [8, 8, 8] and sum(calls) == 24
    # An all-zero map asks for no repair: no stage-2 UNet call, the input comes back unchanged.
    none = FixedMap(model, torch.zeros(1, 1, 16, 16, dtype=torch.long), t1=50, t2=300, steps1=2, steps2=6)
    res0 = none(imgs, ["a", "b", "c"])
    assert res0.nfe.tolist() == [2, 2, 2] and np.array_equal(res0.uint8(), imgs)


def test_repair_locates_and_removes_a_bright_patch_the_paper_setting_keeps():
    """The case docs/methods.md describes, on the embedded trained model: a white corner patch survives SampDetox's
    weak first pass (so is never located) but not the repair's strong one."""
    from pipeline.attacks import apply_trigger, badnets_box
    from pipeline.datasets import load_fashion_mnist
    from pipeline.purify import load_model

    trained = load_model("fmnist-tiny", "cpu")
    clean = load_fashion_mnist("test")[0][:12, None]
    trig = apply_trigger(clean, "badnets")
    rows, cols = badnets_box(28, 28)
    keys = [f"k{i}" for i in range(12)]
    paper = build_purifier("sampdetox", trained, {"t1": 20, "t2": 120, "steps1": 4, "steps2": 12})(trig, keys)
    repair = build_purifier("repair", trained)(trig, keys)
    patch_paper = paper.uint8()[:, 0, rows, cols].reshape(12, -1).mean(1)
    patch_repair = repair.uint8()[:, 0, rows, cols].reshape(12, -1).mean(1)
    assert (patch_paper > 200).mean() > 0.8
    assert (patch_repair < 100).mean() > 0.8
    # Away from the patch the repaired image stays close to the input (semantics kept).
    far = np.abs(repair.uint8()[:, 0, :14, :14].astype(int) - trig[:, 0, :14, :14]).mean()
    assert far < 25


def embedded_schedule(cls):  # noqa: ANN001, ANN201 - a diffusers scheduler class
    """A diffusers scheduler of class `cls` on the embedded model's own schedule (its scheduler/ config)."""
    from pipeline.purify.models import MODELS_DIR

    return cls.from_pretrained(MODELS_DIR / "fmnist-ddpm", subfolder="scheduler")


@pytest.mark.parametrize("t,t_prev,eta,clipped_eps", [
    (250, 225, 0.0, False),  # SDEdit's default grid (t_start 250, 10 steps)
    (300, 250, 0.0, False),  # guided's grid (t_start 300, 6 steps)
    (300, 250, 1.0, False),  # stochastic, as guided and the vote run it
    (100, 80, 0.5, False),
    (250, 0, 0.0, False),    # the last step lands on the clean state (abar = 1: diffusers' set_alpha_to_one)
    (250, 0, 1.0, False),    # sigma is 0 onto the clean state: no noise enters
    (300, 250, 1.0, True),   # a projection hook re-derives eps from x0, as use_clipped_model_output does
])
def test_ddim_step_matches_diffusers_ddim_scheduler(model, t, t_prev, eta, clipped_eps):
    """The hand-written step (sampling.ddim_step, Eq. 12 of DDIM) is diffusers' DDIMScheduler.step on the same
    x_t, eps, t -> t_prev and noise; state t is diffusers' timestep t - 1."""
    from diffusers import DDIMScheduler

    from pipeline.purify.sampling import abar, ddim_step, noise_like, predict_eps

    sched = embedded_schedule(DDIMScheduler)
    assert sched.config.clip_sample and sched.config.prediction_type == "epsilon"
    ours_model = DiffusionModel(model.unet, sched.alphas_cumprod.double(), 16, 1, "tiny")
    g = torch.Generator().manual_seed(t + t_prev)
    x0 = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    x0[0] *= 3  # far outside [-1, 1]: the x0 clamp (clip_sample) is active on this image
    x_t = abar(ours_model, t).sqrt() * x0 + (1 - abar(ours_model, t)).sqrt() * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        eps = predict_eps(ours_model, x_t, t)
    noise = noise_like(x_t, [torch.Generator().manual_seed(i) for i in range(3)])

    stride = t - t_prev
    assert sched.config.num_train_timesteps % stride == 0
    sched.set_timesteps(sched.config.num_train_timesteps // stride)  # diffusers' step goes back T // n timesteps
    ref = sched.step(eps, t - 1, x_t, eta=eta, use_clipped_model_output=clipped_eps,
                     variance_noise=noise if eta > 0 else None).prev_sample
    hook = (lambda x0_pred: x0_pred) if clipped_eps else None
    ours, x0_pred = ddim_step(x_t, eps, abar(ours_model, t), abar(ours_model, t_prev), eta, noise, hook)
    assert (x0_pred.abs() == 1).any()  # the clamp was exercised, not only the smooth part of the formula
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    if eta > 0 and t_prev > 0:  # the noise really entered: without it the two would differ
        quiet, _ = ddim_step(x_t, eps, abar(ours_model, t), abar(ours_model, t_prev), eta, None, hook)
        assert not torch.allclose(quiet, ref, atol=1e-3)


def test_ddim_step_with_eta_1_on_consecutive_states_is_the_ddpm_ancestral_step(model):
    """sampling.ddim_step's claim: eta = 1 between consecutive states is DDPM's step (Ho et al., Eq. 6-7 posterior,
    fixed_small variance), checked against diffusers' DDPMScheduler.step with the same noise."""
    from diffusers.utils.torch_utils import randn_tensor

    from pipeline.purify.sampling import abar, ddim_step, predict_eps

    sched = embedded_schedule(DDPMScheduler)
    assert sched.config.variance_type == "fixed_small"
    ours_model = DiffusionModel(model.unet, sched.alphas_cumprod.double(), 16, 1, "tiny")
    t = 201
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 16, 16, generator=g) * 1.6 - 0.8
    true_eps = torch.randn(x0.shape, generator=g)
    x_t = abar(ours_model, t).sqrt() * x0 + (1 - abar(ours_model, t)).sqrt() * true_eps
    with torch.no_grad():  # the UNet's prediction, nudged toward the true noise so that x0_pred stays in [-1, 1]
        eps = true_eps + 0.05 * predict_eps(ours_model, x_t, t)
    ref = sched.step(eps, t - 1, x_t, generator=torch.Generator().manual_seed(9)).prev_sample
    noise = randn_tensor(tuple(x_t.shape), generator=torch.Generator().manual_seed(9))
    ours, x0_pred = ddim_step(x_t, eps, abar(ours_model, t), abar(ours_model, t - 1), 1.0, noise)
    assert (x0_pred.abs() < 1).all()  # no clamp here: DDPM's posterior mean reads x_t, DDIM's reads eps
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_ssim_map_matches_skimage():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 20, 20, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    ours = ssim_map(a, b)
    for i in range(2):
        _, ref = structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), full=True, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False, data_range=2.0)
        assert np.abs(ours[i, 0].numpy() - ref).max() < 1e-4


def test_unsharp_mask_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = x.numpy()
    ref = np.clip(f + 0.7 * (f - gaussian_filter(f, sigma=(0, 0, 1.2, 1.2), truncate=3.5)), -1, 1)
    assert np.abs(unsharp_mask(x, 0.7, 1.2).numpy() - ref).max() < 1e-5
    assert unsharp_mask(x, 0.0) is x


def test_sharpen_is_the_unsharp_mask_of_the_unsharpened_output(model):
    imgs = batch(3)
    plain = SDEdit(model, t_start=100, steps=3, eta=1.0)(imgs, KEYS7[:3], seed=2)
    sharp = build_purifier("sdedit", model, {"t_start": 100, "steps": 3, "eta": 1.0, "sharpen": 0.5})
    out = sharp(imgs, KEYS7[:3], seed=2)
    assert torch.allclose(out.images, unsharp_mask(plain.images, 0.5, 1.0), atol=1e-5)
    assert torch.equal(out.nfe, plain.nfe)  # no UNet call
    assert sharp.params()["sharpen"] == 0.5 and "sharpen" not in SDEdit(model).params()


def test_the_default_votes_passes_are_sharpened_more_than_a_lone_guided_pass(model):
    # A vote's passes are read by a victim that may take smoothness for a warp trigger (docs/zoo.md, sharpening):
    # the default vote's guided base sharpens at 1.0 and trusts blocks up to 0.6 unless told otherwise; a lone
    # `guided` pass keeps 0.5 and 0.4.
    vote = build_purifier("cascade", model)
    assert vote.base.params()["sharpen"] == 1.0 and vote.base.params()["restart_tau"] == 0.8
    assert vote.base.params()["tau"] == 0.6 and vote.params()["original_quantile"] == 0.3
    assert build_purifier("guided", model).params()["sharpen"] == 0.5
    assert build_purifier("guided", model).params()["tau"] == 0.4
    # The benchmark's default row is the default, and its earlier rows keep what they measured (tau 0.4, then 0.5
    # with the gate at the 0.4-quantile).
    grid = {label: params for label, _, params in GRID}
    assert build_purifier("cascade", model, grid[DEFAULT_LABEL]).params() == vote.params()
    assert build_purifier("cascade", model, grid["vote-guided4-k5-q40-v3-restart-sharp1"]).base.params()["tau"] == 0.4
    previous = build_purifier("cascade", model, grid["vote-guided4-k5-q40-v3-restart-sharp1-tau5-support3"])
    assert previous.base.params()["tau"] == 0.5 and previous.params()["original_quantile"] == 0.4
    # The default's ballots ask for the passes' support; the earlier rows' ballots did not.
    assert vote.params()["original_support"] == 0.3
    assert build_purifier("cascade", model, grid["vote-guided4-k5-q40-v3-restart-sharp1-tau5"]).params()[
        "original_support"] == 0.0
    # The default picks the class that out-votes the original by probability; the earlier rows by votes.
    assert vote.params()["pick"] == "probability"
    assert {build_purifier(m, model, p).params()["pick"] for label, m, p in GRID
            if m == "cascade" and label != DEFAULT_LABEL} == {"votes"}
    assert build_purifier("cascade", model, {"sharpen": 0.5}).base.params()["sharpen"] == 0.5
    imgs = batch(2)
    a = build_purifier("cascade", model, {"sharpen": 0.0}).base(imgs, KEYS7[:2], seed=1)
    b = vote.base(imgs, KEYS7[:2], seed=1)
    assert torch.allclose(b.images, unsharp_mask(a.images, 1.0, 1.0), atol=1e-5)


def test_unveil_clears_a_dark_veil_only_and_is_the_domains_default_for_guided():
    model = tiny_model()
    clean = np.zeros((2, 1, 16, 16), np.uint8)
    clean[:, :, 4:12, 4:12] = 200
    clean[:, :, 6, 6:9] = 30  # dark detail, below the black level: 1% of the pixels
    hazy = clean.copy()
    hazy[clean == 0] = np.random.default_rng(0).integers(0, 51, int((clean == 0).sum()))  # a veil below 0.2
    unveiling = SDEdit(model, t_start=100, steps=3, black_level=0.2, veil_share=0.2)
    plain = SDEdit(model, t_start=100, steps=3)
    # A dead zone, not a rescale: a veiled image reaches the sampler as its unveiled self (dark detail cleared too),
    # so both give the same output bit for bit ...
    unveiled = np.where(clean < 51, 0, clean).astype(np.uint8)
    assert torch.equal(unveiling(hazy, ["a", "b"], 1).images, plain(unveiled, ["a", "b"], 1).images)
    assert not torch.equal(plain(hazy, ["a", "b"], 1).images, plain(unveiled, ["a", "b"], 1).images)
    # ... while an image with little in the haze band keeps its dark detail; share 0 unveils every image.
    assert torch.equal(unveiling(clean, ["a", "b"], 1).images, plain(clean, ["a", "b"], 1).images)
    always = SDEdit(model, t_start=100, steps=3, black_level=0.2, veil_share=0.0)
    assert torch.equal(always(clean, ["a", "b"], 1).images, plain(unveiled, ["a", "b"], 1).images)
    assert unveiling.params()["black_level"] == 0.2 and unveiling.params()["veil_share"] == 0.2
    assert "black_level" not in plain.params()
    # Guided (ours) takes the model's domain prior unless told; the published methods stay as published.
    model.black_level, model.veil_share = 0.2, 0.2
    assert (Guided(model).black_level, Guided(model).veil_share) == (0.2, 0.2)
    assert Guided(model, black_level=0.0).black_level == 0.0 and SDEdit(model).black_level == 0.0
    assert torch.equal(Guided(model, t_start=100, steps=3)(hazy, ["a", "b"], 1).images,
                       Guided(model, t_start=100, steps=3, black_level=0.0)(unveiled, ["a", "b"], 1).images)
    for bad in ({"black_level": -0.1}, {"black_level": 1.0}, {"veil_share": 1.5}):
        with pytest.raises(ValueError, match="black_level|veil_share"):
            build_purifier("guided", model, bad)


def test_bad_input_raises_clear_errors(model):
    p = SDEdit(model, t_start=50, steps=2)
    with pytest.raises(ValueError, match="N, C, H, W"):
        p(np.zeros((16, 16), np.uint8), ["a"])
    with pytest.raises(TypeError, match="uint8 or float"):
        p(np.zeros((1, 1, 16, 16), np.int32), ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p(np.full((1, 1, 16, 16), 3.0, np.float32), ["a"])
    nan = np.full((2, 1, 16, 16), 0.5, np.float32)
    nan[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        p(nan, ["a", "b"])
    with pytest.raises(ValueError, match="channel"):
        p(np.zeros((1, 3, 16, 16), np.uint8), ["a"])
    with pytest.raises(ValueError, match="keys"):
        p(np.zeros((2, 1, 16, 16), np.uint8), ["a"])
    with pytest.raises(ValueError, match="size_policy='error'"):
        SDEdit(model, t_start=50, steps=2, size_policy="error")(np.zeros((1, 1, 12, 12), np.uint8), ["a"])
    with pytest.raises(ValueError, match="steps"):
        SDEdit(model, t_start=5, steps=10)
    with pytest.raises(ValueError, match="divisible"):
        ZIP(tiny_model(size=18), degradation="pool4")
    with pytest.raises(TypeError, match="bad params"):
        build_purifier("sdedit", model, {"nonsense": 1})
    with pytest.raises(ValueError, match="sharpen"):
        build_purifier("sdedit", model, {"sharpen": -1})
    with pytest.raises(ValueError, match="unknown method"):
        build_purifier("magic", model)
    with pytest.raises(ValueError, match="at least one channel and pixel"):
        p(np.zeros((1, 1, 0, 16), np.uint8), ["a"])


@pytest.mark.parametrize("method, params, match", [
    ("sdedit", {"eta": float("nan")}, "eta"),  # every output would be NaN, then black
    ("zip", {"eta": 5.0}, "eta"),  # a variance past 1 - a_prev, hidden by a clamp
    ("guided", {"eta": -0.5}, "eta"),
    ("sampdetox", {"eta": 2.0}, "eta"),
    ("sampdetox", {"ssim_sigma": 0.0}, "ssim_sigma"),
    ("sampdetox", {"ssim_sigma": 20.0}, "ssim_sigma"),  # a window wider than the image
    ("sampdetox", {"steps1": 0}, "steps"),  # not read as "full DDPM"
    ("sdedit", {"sharpen": 1.0, "sharpen_sigma": 3.0, "size_policy": "resize"}, None),  # fits 16 pixels
    ("zip", {"degradation": "pool1"}, "identity"),  # A = I: ZIP would copy the input back
    ("zip", {"degradation": "gray+pool1"}, "identity"),
    ("zip", {"degradation": "gray+pool2", "combine": "average"}, "identity"),  # half the input copied back
    ("zip", {"degradation": "blur0"}, "sigma"),  # a 0/0 kernel: NaN images
    ("zip", {"degradation": "pool0"}, "at least 1"),
])
def test_params_that_would_fail_or_do_nothing_later_are_refused_when_built(model, method, params, match):
    """Each of these was accepted and then crashed every batch, or ran and returned black or untouched images."""
    if match is None:
        build_purifier(method, model, params)
        return
    with pytest.raises(ValueError, match=match):
        build_purifier(method, model, params)


def test_chained_pools_check_each_measurement_and_run():
    small = tiny_model(size=12)  # 12 -> 6 -> 3 under pool2+pool2; pool2+pool4 would need 6 % 4 == 0
    with pytest.raises(ValueError, match="pool4 needs an image size divisible by 4, got 6"):
        ZIP(small, degradation="pool2+pool4", t_start=20, steps=2)
    out = ZIP(small, degradation="pool2+pool2", t_start=20, steps=2)(np.zeros((2, 1, 12, 12), np.uint8), ["a", "b"])
    assert out.images.shape == (2, 1, 12, 12)


def test_size_policies_return_the_input_size(model):
    imgs = batch(2, size=12)
    for policy in ("resize", "pad"):
        out = SDEdit(model, t_start=50, steps=2, size_policy=policy)(imgs, ["a", "b"])
        assert out.images.shape == (2, 1, 12, 12)
    assert SDEdit(model, t_start=50, steps=2)(imgs.astype(np.float32) / 255, ["a", "b"]).images.shape[-1] == 12


def test_majority_vote_ties_and_missing():
    votes = np.array([[1, 2, 2], [3, -1, -1], [4, 5, -1], [-1, -1, -1]])
    labels, agree = majority(votes)
    assert labels.tolist() == [2, 3, 4, -1]
    assert agree.tolist() == pytest.approx([2 / 3, 1.0, 0.5, 0.0])


def test_cascade_escalates_only_flipped_rows(model):
    imgs = batch(6)
    flip_keys = {1, 4}

    def classify(x: np.ndarray) -> np.ndarray:
        # A stand-in black box: labels by mean brightness; the *original* images 1 and 4 get label 9.
        lab = (x.reshape(len(x), -1).mean(1) > 127).astype(np.int64)
        for i in flip_keys:
            lab[(x == imgs[i]).reshape(len(x), -1).all(1)] = 9
        return lab

    c = Cascade(SDEdit(model, t_start=60, steps=3), k=3, escalate="flip")
    out = c.run(imgs, [str(i) for i in range(6)], seed=0, classify=classify)
    escalated = np.flatnonzero(out.votes[:, 0] != out.pred_orig)
    assert set(escalated) >= flip_keys  # a row near the brightness threshold may flip on its own
    for i in escalated:  # the third pass runs only where the first two disagree
        assert out.nfe[i] == (9 if out.votes[i, 0] != out.votes[i, 1] else 6)
        assert (out.votes[i, 2] >= 0) == (out.votes[i, 0] != out.votes[i, 1])
    assert all(out.nfe[i] == 3 and (out.votes[i, 1:] == -1).all() for i in set(range(6)) - set(escalated))
    assert out.flagged.tolist() == (out.labels != out.pred_orig).tolist()
    assert out.images.shape == imgs.shape and out.images.dtype == np.uint8


def test_needs_pass_stops_once_the_vote_is_decided():
    orig = np.array([0, 0, 0, 0])
    # After one pass: flip escalates only rows whose purified label differs; always escalates every row.
    one = np.array([[0], [1], [2], [-1]])
    assert needs_pass(orig, one, 3, "flip").tolist() == [False, True, True, True]
    assert needs_pass(orig, one, 3, "always").tolist() == [True, True, True, True]
    # After two passes of k = 3: agreeing rows are decided (2 > 0 + 1 left), disagreeing rows need the third.
    two = np.array([[5, 5], [1, 2], [2, 2], [3, -1]])
    assert needs_pass(orig, two, 3, "always").tolist() == [False, True, False, True]
    # k = 5 after three passes: 3-0 is decided, 2-1 is not (2 left could make it 2-3).
    three = np.array([[4, 4, 4], [4, 4, 7], [1, 2, 3], [4, 7, 7]])
    assert needs_pass(orig, three, 5, "always").tolist() == [False, True, True, True]
    # The original label's ballots count towards the decision.
    one_ballot = original_ballots(orig[:1], None, 1, None)
    assert needs_pass(orig[:1], np.array([[0, 1]]), 3, "always", one_ballot).tolist() == [True]
    assert needs_pass(orig[:1], np.array([[0, 0]]), 3, "always", one_ballot).tolist() == [False]
    # Two ballots for label 0 + one pass of 0: 3 against at most 0 + 4 passes left of k = 5 -> open; + a second
    # pass of 0: 4 > 0 + 3 -> decided after two passes instead of three.
    two = original_ballots(orig[:1], np.array([0.5]), 2, 0.95)
    assert needs_pass(orig[:1], np.array([[0]]), 5, "always", two).tolist() == [True]
    assert needs_pass(orig[:1], np.array([[0, 0]]), 5, "always", two).tolist() == [False]
    with pytest.raises(ValueError, match="escalate"):
        needs_pass(orig, one, 3, "sometimes")


def test_original_ballots_open_only_below_the_score_gate():
    pred = np.array([3, 3, 3, 3, -1])
    score = np.array([0.5, 0.949, 0.95, np.nan, 0.2], np.float32)
    assert original_ballots(pred, score, 2, 0.95).tolist() == [[3, 3], [3, 3], [-1, -1], [-1, -1], [-1, -1]]
    # No scores (a label-only black box): closed unless ungated; a failed query (-1) never votes.
    assert (original_ballots(pred, None, 1, 0.95) == -1).all()
    assert original_ballots(pred, None, 1, None).tolist() == [[3], [3], [3], [3], [-1]]
    assert original_ballots(pred, score, 0, 0.95).shape == (5, 0)


def test_cascade_original_label_votes_only_where_the_black_box_was_unsure(model):
    """Two identical rows whose passes split 2-3 against the original label: the unsure original (p .6) wins
    with its two ballots, the certain one (p .999, what a trigger looks like) is outvoted."""
    imgs = np.repeat(batch(1), 2, axis=0)
    calls = {"n": 0}

    def classify(x: np.ndarray) -> Prediction:
        calls["n"] += 1
        j = calls["n"] - 1  # pass j: labels 4, 7, 7, 4, 7 for every row
        lab = np.full(len(x), [4, 7, 7, 4, 7][j], np.int64)
        if j > 0:
            return Prediction(lab, None, [None] * len(x))
        # The first query holds the originals (label 4, unsure then certain), then pass 0.
        probs = np.full((4, 10), 0.0, np.float32)
        probs[:2, 4] = [0.6, 0.999]
        probs[2:, 4] = 1.0
        lab[:2] = 4
        return Prediction(lab, probs, [None] * 4)

    c = Cascade(SDEdit(model, t_start=100, steps=1), k=5, escalate="always", original_votes=2, original_below=0.95)
    out = c.run(imgs, ["a", "a"], seed=0, classify=classify)
    assert out.labels.tolist() == [4, 7]
    assert out.flagged.tolist() == [False, True]
    # Same rows, gate off: the plain vote says 7 for both.
    calls["n"] = 0
    plain = Cascade(SDEdit(model, t_start=100, steps=1), k=5, escalate="always", original_votes=0)
    assert plain.run(imgs, ["a", "a"], seed=0, classify=classify).labels.tolist() == [7, 7]
    with pytest.raises(ValueError, match="original_below"):
        Cascade(SDEdit(model, t_start=100, steps=1), original_below=1.5)
    with pytest.raises(ValueError, match="original_votes"):
        Cascade(SDEdit(model, t_start=100, steps=1), k=3, original_votes=4)


def test_original_ballots_need_the_passes_support(model):
    """An unsure original (p .6) whose passes split 2-3 against it: its ballots win where the passes keep giving its
    label some probability (.35, what an unsure clean image keeps), and are withdrawn where the passes that vote
    against it give it almost none (.02: a trigger whose effect purification took away)."""
    img = batch(1)

    def black_box(against: float):
        calls = {"n": 0}

        def classify(x: np.ndarray) -> Prediction:
            j = calls["n"]
            calls["n"] += 1
            lab = [4, 7, 7, 4, 7][j]
            probs = np.zeros((1, 10), np.float32)
            probs[0, 4] = 0.55 if lab == 4 else against
            probs[0, 7] = 1 - probs[0, 4]
            if j == 0:  # the first query holds the original (label 4, p .6), then pass 0
                orig = np.zeros((1, 10), np.float32)
                orig[0, [4, 7]] = 0.6, 0.4
                probs = np.concatenate([orig, probs])
            return Prediction(probs.argmax(1), probs, [None] * len(probs))

        return classify

    def vote(support: float, against: float) -> tuple[int, int]:
        c = Cascade(SDEdit(model, t_start=100, steps=1), k=5, escalate="always", original_votes=3,
                    original_below=0.95, original_support=support)
        out = c.run(img, ["a"], seed=0, classify=black_box(against))
        return int(out.labels[0]), int((out.votes[0] >= 0).sum())

    assert vote(0.3, against=0.35) == (4, 4)  # supported: decided after 4 passes
    assert vote(0.3, against=0.02) == (7, 5)
    assert vote(0.0, against=0.02)[0] == 4  # support off: the ballots count whatever the passes say
    # A gate that always opens (original_below null) still asks for the support.
    always = Cascade(SDEdit(model, t_start=100, steps=1), k=5, escalate="always", original_votes=3,
                     original_below=None, original_support=0.3)
    out = always.run(img, ["a"], seed=0, classify=black_box(0.02))
    assert int(out.labels[0]) == 7
    assert always.ballots(np.array([4]), np.array([0.6]), np.array([0.02])).tolist() == [[-1, -1, -1]]
    assert always.ballots(np.array([4]), np.array([0.6]), np.array([0.35])).tolist() == [[4, 4, 4]]
    assert supported(None, np.array([0.5]), 0.3) is None  # a label-only black box has nothing to support
    assert np.isnan(supported(np.array([0.6], np.float32), np.array([np.nan], np.float32), 0.3)[0])
    with pytest.raises(ValueError, match="original_support"):
        Cascade(SDEdit(model, t_start=100, steps=1), original_support=1.5)


def test_passes_that_out_vote_the_original_pick_their_class_by_probability(model):
    """A certain original (label 0, what a trigger looks like) whose 3 passes vote 7, 2, 7: by votes 7 wins; by the
    probability summed over the passes, 2 (.40 + .90 + .40 against .45 + .05 + .45), and the output image is the
    first pass that voted 2. A black box without scores picks by votes."""
    img = batch(1)
    # per pass: (label, {class: probability})
    passes = [(7, {7: 0.45, 2: 0.40, 0: 0.15}), (2, {2: 0.90, 7: 0.05, 0: 0.05}), (7, {7: 0.45, 2: 0.40, 0: 0.15})]

    def black_box(scored: bool):
        calls = {"n": 0}

        def classify(x: np.ndarray) -> Prediction:
            j = calls["n"]
            calls["n"] += 1
            probs = np.zeros((1, 10), np.float32)
            for c, p in passes[j][1].items():
                probs[0, c] = p
            if j == 0:  # the first query holds the original (label 0, p .999), then pass 0
                orig = np.zeros((1, 10), np.float32)
                orig[0, 0] = 0.999
                probs = np.concatenate([orig, probs])
            return Prediction(probs.argmax(1), probs if scored else None, [None] * len(probs))

        return classify

    def vote(pick: str, scored: bool = True):
        c = Cascade(SDEdit(model, t_start=100, steps=1), k=3, escalate="always", original_votes=3,
                    original_below=0.95, pick=pick)
        return c.run(img, ["a"], seed=0, classify=black_box(scored))

    by_votes, by_prob = vote("votes"), vote("probability")
    assert by_votes.votes[0].tolist() == by_prob.votes[0].tolist() == [7, 2, 7]  # the same rounds
    assert int(by_votes.labels[0]) == 7 and int(by_prob.labels[0]) == 2
    second = SDEdit(model, t_start=100, steps=1)(img, ["a"], escalation_seeds(0, 3)[0]).uint8()
    assert (by_prob.images == second).all() and not (by_votes.images == second).all()
    assert int(vote("probability", scored=False).labels[0]) == 7
    # Only classes the passes voted, never the original's: here the passes give the original (0) the most.
    scores = np.zeros((3, 10))
    scores[:, 0], scores[:, 2], scores[:, 7] = 2.0, 0.5, 0.4
    labels = by_probability(np.array([7, 0, 7]), np.array([0, 0, 0]), np.array([[7, 0, 2], [0, 0, 7], [7, 7, 2]]),
                            np.where(np.arange(3)[:, None] == 2, np.nan, scores))
    assert labels.tolist() == [2, 0, 7]  # picked among {7, 2}; the original's own win kept; unknown scores: votes
    assert Cascade(SDEdit(model, t_start=100, steps=1)).params()["pick"] == "probability"
    with pytest.raises(ValueError, match="pick"):
        Cascade(SDEdit(model, t_start=100, steps=1), pick="loudest")


def test_always_cascade_equals_a_full_majority_vote(model):
    """Early exit must not change any label: the k-pass majority of every row, at fewer NFE."""
    imgs = batch(8)

    def classify(x: np.ndarray) -> np.ndarray:  # a noisy-ish stand-in: brightness buckets
        return (x.reshape(len(x), -1).mean(1) // 12).astype(np.int64)

    base = SDEdit(model, t_start=300, steps=2, eta=1.0)
    keys = [f"m{i}" for i in range(8)]
    out = Cascade(base, k=3, escalate="always").run(imgs, keys, seed=3, classify=classify)
    full = np.stack([classify(base(imgs, keys, s).uint8()) for s in [3, *escalation_seeds(3, 3)]], 1)
    want, _ = majority(full)
    assert out.labels.tolist() == want.tolist()
    ran = out.votes >= 0
    assert (out.votes[ran] == full[ran]).all() and ran[:, :2].all()
    assert out.nfe.tolist() == (2 * ran.sum(1)).tolist()
    assert ran[:, 2].tolist() == (full[:, 0] != full[:, 1]).tolist()


def test_loading_the_embedded_model_logs_no_warning(recwarn):
    """A user cannot act on diffusers' `accelerate` notice (this project loads small UNets without it), so loading
    passes low_cpu_mem_usage=False instead of logging it on every actor start."""
    import logging

    from pipeline.purify import load_model

    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = records.append
    logger = logging.getLogger("diffusers")  # diffusers' library root logger: its modules log under it
    logger.addHandler(catcher)
    try:
        loaded = load_model("fmnist-tiny", "cpu")
    finally:
        logger.removeHandler(catcher)
    assert not [r.getMessage() for r in records]
    assert not [str(w.message) for w in recwarn.list]
    assert sum(p.numel() for p in loaded.unet.parameters()) == 1_692_801  # the model really loaded


def test_measured_gate_is_a_quantile_of_the_black_box_own_answers(model):
    from pipeline.purify import build_purifier
    from pipeline.purify.cascade import gate_threshold

    top = np.array([0.2, 0.9, 0.5, np.nan, 0.7], np.float32)
    assert gate_threshold(top, 0.5) == pytest.approx(np.quantile([0.2, 0.9, 0.5, 0.7], 0.5))
    assert gate_threshold(None, 0.5) == 0.0 and gate_threshold(np.full(3, np.nan), 0.5) == 0.0

    vote = build_purifier("cascade", model, {"base": "sdedit", "t_start": 100, "steps": 1, "k": 3,
                                             "original_quantile": 0.4})
    assert vote.needs_calibration and vote.original_below is None
    imgs = batch(2)
    with pytest.raises(RuntimeError, match="calibrate"):
        vote.run(imgs, ["a", "b"], 0, lambda x: np.zeros(len(x), np.int64))
    # Two victims that rank their answers alike but state them on other scales measure other thresholds that open
    # the gate for the same rows: the less sure half of what each says.
    for scale in (1.0, 0.9):
        thr = vote.calibrate(scale * np.array([0.99, 0.999, 0.6, 0.9999, 0.7]))
        assert thr == pytest.approx(scale * np.quantile([0.99, 0.999, 0.6, 0.9999, 0.7], 0.4))
        opened = vote.ballots(np.array([1, 1, 1, 1, 1]), scale * np.array([0.99, 0.999, 0.6, 0.9999, 0.7]))
        assert (opened[:, 0] >= 0).tolist() == [False, False, True, False, True]
    assert vote.params()["original_quantile"] == 0.4 and vote.params()["original_below"] == pytest.approx(thr)
    # Given with the quantile, a threshold is that measurement (what sanitize hands its purify actors).
    again = build_purifier("cascade", model, {**{k: v for k, v in vote.params().items() if k != "base"},
                                              "base": "sdedit"})
    assert not again.needs_calibration and again.original_below == pytest.approx(thr)
    with pytest.raises(ValueError, match="original_quantile"):
        build_purifier("cascade", model, {"original_quantile": 1.5})
    # The job measures the gate exactly when the vote it builds needs one: null ballots are the default ballots.
    from pipeline.config import load_config
    from pipeline.job import measured_gate

    cfg = load_config(overrides=[])
    for params, measured in (({"original_votes": None}, (0.3, 256)), ({}, (0.3, 256)), ({"original_votes": 0}, None),
                             ({"original_below": 0.9}, None)):
        cfg.purify.params = params
        assert measured_gate(cfg) == measured
        assert build_purifier("cascade", model, {**params, "base": "sdedit"}).needs_calibration == bool(measured)


def test_methods_refuse_what_they_cannot_do_instead_of_doing_nothing(model, tmp_path):
    # ZIP's 'gray' on a one-channel model is A = I: the projection would copy the whole input, trigger included.
    with pytest.raises(ValueError, match="identity"):
        ZIP(model, degradation="gray")
    ZIP(model, degradation="gray+pool2")  # beside another operator it is harmless
    ZIP(tiny_model(channels=3), degradation="gray")
    # A model that predicts something other than the noise would be read as noise by every purifier.
    from pipeline.purify.models import load_model

    folder = tmp_path / "v-model"
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                layers_per_block=1).save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    with pytest.raises(ValueError, match="v_prediction"):
        load_model(str(folder), "cpu")
    # A vote of fewer passes than the default ballots, built directly, gets as many ballots as passes.
    assert Cascade(SDEdit(model, t_start=50, steps=2), k=1).original_votes == 1
    assert Cascade(SDEdit(model, t_start=50, steps=2), k=2).original_votes == 2
    assert build_purifier("cascade", model, {"k": 2, "base": "sdedit"}).original_votes == 2
