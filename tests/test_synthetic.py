"""Synthetic calibration samples: natural structure for images and for everything else."""

import warnings

import numpy as np
import pytest

from spa import synthetic


def test_noise_has_the_spectrum_of_natural_signals():
    """Non-image samples are standardized per sample, and most of their power is at low
    frequencies (white noise has the same power at every frequency)."""
    noise = np.random.default_rng(0).standard_normal((16, 40, 40)).astype(np.float32)
    shaped = synthetic.pink(noise, seed=0)
    assert shaped.dtype == np.float32 and shaped.shape == noise.shape
    assert np.allclose(shaped.std(axis=(1, 2)), 1, atol=1e-3)
    assert np.allclose(shaped.mean(axis=(1, 2)), 0, atol=1e-3)
    power = np.abs(np.fft.fft2(shaped)) ** 2
    assert power[:, 1:4, 1:4].mean() > 100 * power[:, 15:25, 15:25].mean()
    vectors = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    assert np.array_equal(synthetic.pink(vectors, seed=0), vectors)  # nothing long enough


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((8, 3, 32, 32), 1),
        ((8, 32, 32, 3), 3),
        ((8, 1, 28, 28), 1),
        ((8, 28, 28, 1), 3),
        ((8, 64, 32, 32), None),  # 64 channels: a feature map, not an image
        ((8, 3, 4, 4), None),  # too small to have structure
        ((8, 3, 32), None),
    ],
)
def test_images_are_recognized_by_shape(shape, axis):
    assert synthetic.image_channel_axis(shape) == axis


def test_images_are_dead_leaves_and_noise():
    """Every other image is dead leaves (flat regions with edges between them, colour channels
    correlated), the rest 1/f noise; standardized, channels first or last, the same samples from
    the same seed."""
    images = synthetic.fill((64, 3, 48, 40), np.float32, seed=5)
    assert images.shape == (64, 3, 48, 40) and images.dtype == np.float32
    assert np.allclose(images.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert np.array_equal(images, synthetic.fill((64, 3, 48, 40), np.float32, seed=5))

    def flat(x):  # most steps between neighbours are small against the few large ones
        steps = np.abs(np.diff(x, axis=-1))
        return np.median(steps) / np.percentile(steps, 99)

    leaves, noise = images[::2], images[1::2]
    assert flat(leaves) < 0.08 < flat(noise)  # 1/f noise: 0.17
    assert np.corrcoef(leaves[:, 0].ravel(), leaves[:, 1].ravel())[0, 1] > 0.6
    last = synthetic.fill((4, 48, 40, 3), np.float64, seed=5)
    assert last.shape == (4, 48, 40, 3) and last.dtype == np.float64
    assert flat(np.moveaxis(last[::2], -1, 1)) < 0.08


def test_every_pixel_shows_a_leaf():
    layout = synthetic.leaf_layout((50, 70), np.random.default_rng(0))
    assert layout.shape == (50, 70) and layout.max() > 10
    assert (layout == 0).mean() <= synthetic.BARE  # the backmost leaf shows where none fell


def test_large_images_cost_no_more_leaves():
    """Leaf sizes scale with the image (above MIN_RADIUS pixels): a 1024x1024 image has about as
    many leaves as a 224x224 one (it had 21x as many, seconds per layout)."""
    small = synthetic.leaf_layout((224, 224), np.random.default_rng(0)).max()
    large = synthetic.leaf_layout((1024, 1024), np.random.default_rng(0)).max()
    assert large < 2 * small


def test_an_image_model_calibrates_on_both_kinds():
    """`--calibration synthetic` on an MNIST CNN (1 x 28 x 28): SYNTHETIC_SAMPLES standardized
    samples in batches, dead leaves and noise alternating in every batch."""
    from spa import calibration, io, runtime

    sess = runtime.session(io.load("models/mnist/vgg.onnx"))
    feeds = calibration.batches("synthetic", sess)
    x = np.concatenate([f[sess.get_inputs()[0].name] for f in feeds])
    assert x.shape == (calibration.SYNTHETIC_SAMPLES, 1, 28, 28)
    assert np.allclose(x.std(axis=(1, 2, 3)), 1, atol=1e-3)
    flat = [np.median(d) / np.percentile(d, 99) for d in (np.abs(np.diff(x[i::2])) for i in (0, 1))]
    assert flat[0] < 0.08 < flat[1]


@pytest.mark.parametrize("shape", [(4, 0, 28, 28), (4, 3, 0, 28), (0, 3, 28, 28), (4, 0)])
def test_empty_samples_are_empty_without_warnings(shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert synthetic.fill(shape, np.float32, seed=0).shape == shape
