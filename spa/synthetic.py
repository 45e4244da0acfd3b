"""Synthetic calibration samples for the data-free mode: inputs with the structure of natural ones.

A layer's response to inputs without the structure of real ones says little about its response to
real inputs. Two kinds of structure, by the input's shape:
- anything: noise with a 1/f^a spectrum along every long axis (sounds, spectrograms, series).
- images (a batch of 2-D fields with up to 4 colour channels, channels first or last): half of
  them "dead leaves", opaque discs and squares of every size (density ~ 1/r^3), each of one colour
  with texture, occluding each other: the edges, flat regions and scale invariance of photos (Lee,
  Mumford & Huang 2001; Baradad et al. 2021 found them among the best synthetic images to train
  on), colours correlated across channels as in photos (mostly brightness); the other half noise.
  Measured data-free at 0.9 of the MACs on EfficientNet-Lite0 (ImageNet), top-1 agreement with
  the original on 400 held-out crops: noise 0.51, dead leaves 0.58-0.63, half and half 0.56-0.64;
  but dead leaves alone cost the MNIST CNNs up to 13 points of top-1 at ratio 0.3, half and half
  at most 0.2 (and gains 3-17 at ratio 0.5).
Samples are standardized per sample, mean 0 and standard deviation 1: spa assumes standardized
inputs (EfficientNet-Lite0's (x - 127) / 128 are about 0.5: its half and half at 0.5 kept 0.59-0.65,
but cost MobileNetV2 on MNIST 15-20 points at ratio 0.5).
"""

from __future__ import annotations

import math

import numpy as np

# Spectral slopes of the noise, drawn per sample: natural images and sounds have amplitude spectra
# falling as 1/f^a with a around 1 to 2.
PINK_SLOPES = (1.0, 2.0)
PINK_MIN_SIZE = 8  # axes shorter than this (batch, colour channels) stay white
PINK_CHUNK = 32

IMAGE_CHANNELS = 4  # at most this many channels along an axis beside two long ones: an image
# Leaf radii, as fractions of the image's shorter side (the same picture at any resolution, and as
# many leaves: 1,400 or so), but at least MIN_RADIUS pixels: smaller leaves make noise of single
# pixels (MNIST CNNs calibrated on those lost up to 37 points of top-1).
RADII = (1 / 75, 0.8)
MIN_RADIUS = 3.0
# The last bare pixels take most of the leaves to cover (small ones, falling anywhere): that much
# is left to the background.
BARE = 0.01
LAYOUTS = 32
TEXTURE = 0.3  # the amplitude of each leaf's 1/f texture against its colour's (1)


def fill(shape: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
    """Synthetic samples of `shape` (samples first), of a floating dtype."""
    if math.prod(shape) == 0:  # nothing to shape (and no spread to standardize by)
        return np.zeros(shape, dtype)
    rng = np.random.default_rng(seed)
    channels = image_channel_axis(shape)
    if channels is None:
        return pink(rng.standard_normal(shape).astype(dtype), seed)
    first = channels == 1
    size = shape[2:] if first else shape[1:3]
    images = np.empty((shape[0], shape[channels], *size), np.float32)
    # half of each kind, alternating: both in every batch
    images[::2] = dead_leaves(len(images[::2]), size, shape[channels], rng)
    images[1::2] = pink(rng.standard_normal(images[1::2].shape).astype(np.float32), seed)
    return (images if first else np.moveaxis(images, 1, -1)).astype(dtype)


def image_channel_axis(shape: tuple[int, ...]) -> int | None:
    """1 or 3 where `shape` is a batch of images (samples, channels, height, width) or (samples,
    height, width, channels): up to IMAGE_CHANNELS channels, both sides at least PINK_MIN_SIZE."""
    if len(shape) != 4:
        return None
    for channels, sides in ((1, shape[2:]), (3, shape[1:3])):
        if shape[channels] <= IMAGE_CHANNELS and min(sides) >= PINK_MIN_SIZE:
            return channels
    return None


def dead_leaves(
    count: int, size: tuple[int, int], channels: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` dead-leaves images (count, channels, *size), float32, standardized.
    Drawing the leaves and their textures is what costs: LAYOUTS are drawn, each image takes one,
    its texture's sign and channel order at random, its own colours, and flips it at random."""
    layouts = [leaf_layout(size, rng) for _ in range(min(count, LAYOUTS))]
    textures = TEXTURE * pink(
        rng.standard_normal((len(layouts), channels, *size)).astype(np.float32),
        int(rng.integers(2**31)),
    )
    images = np.empty((count, channels, *size), np.float32)
    for i in range(count):
        leaves = layouts[i % len(layouts)]
        # mostly brightness, some colour: channels correlate as in photos
        colours = 0.9 * rng.standard_normal((1, leaves.max() + 1)) + 0.35 * rng.standard_normal(
            (channels, leaves.max() + 1)
        )
        texture = textures[i % len(layouts), rng.permutation(channels)]
        image = colours[:, leaves] + rng.choice((-1, 1)) * texture
        images[i] = np.flip(image, [a for a in (1, 2) if rng.uniform() < 0.5])
    return _standardized(images)


def leaf_layout(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Which leaf each pixel shows (int32, 0 the backmost): leaves fall front to back, each covering
    only what is still bare, until all but BARE of the image is covered; the last lies behind them
    all."""
    height, width = size
    low, high = (max(f * min(size), MIN_RADIUS + i) for i, f in enumerate(RADII))
    layout = np.zeros(size, np.int32)
    bare, left, leaf = np.ones(size, bool), height * width, 0
    while left > BARE * height * width:
        # radius with density ~ 1/r^3 on [low, high] (inverse of its distribution function)
        r = (rng.uniform() * (low**-2 - high**-2) + high**-2) ** -0.5
        cy, cx = rng.uniform(-r, height + r), rng.uniform(-r, width + r)
        y0, y1 = max(0, math.floor(cy - r)), min(height, math.ceil(cy + r))
        x0, x1 = max(0, math.floor(cx - r)), min(width, math.ceil(cx + r))
        if y0 >= y1 or x0 >= x1:
            continue
        new = bare[y0:y1, x0:x1].copy()
        if rng.uniform() < 0.5:  # a disc, else a square
            yy, xx = np.ogrid[y0:y1, x0:x1]
            new &= (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < r * r
        covered = int(new.sum())
        if covered:
            leaf += 1
            layout[y0:y1, x0:x1][new] = leaf
            bare[y0:y1, x0:x1] &= ~new
            left -= covered
    return layout


def pink(noise: np.ndarray, seed: int) -> np.ndarray:
    """White noise -> 1/f^a noise along every axis of at least PINK_MIN_SIZE (but the first),
    standardized per sample. Measured on MNIST CNNs pruned at 0.3 from synthetic statistics: white
    noise keeps 10-46% top-1, this keeps 87-92%. PINK_CHUNK samples at a time: the spectra are
    complex128, 4x the bytes of float32 samples."""
    axes = [a for a in range(1, noise.ndim) if noise.shape[a] >= PINK_MIN_SIZE]
    if not axes:
        return noise
    rng = np.random.default_rng(seed)
    radius = np.zeros([noise.shape[a] if a in axes else 1 for a in range(noise.ndim)])
    for a in axes:
        frequency = np.fft.fftfreq(noise.shape[a]).reshape(
            [-1 if b == a else 1 for b in range(noise.ndim)]
        )
        radius = radius + frequency**2
    radius = np.sqrt(radius)
    # the mean keeps the lowest frequency's weight
    radius[radius == 0] = 1.0 / max(noise.shape[a] for a in axes)
    slopes = rng.uniform(*PINK_SLOPES, size=(len(noise),) + (1,) * (noise.ndim - 1))
    shaped = np.empty_like(noise)
    for i in range(0, len(noise), PINK_CHUNK):
        spectrum = (
            np.fft.fftn(noise[i : i + PINK_CHUNK], axes=axes) / radius ** slopes[i : i + PINK_CHUNK]
        )
        shaped[i : i + PINK_CHUNK] = _standardized(np.real(np.fft.ifftn(spectrum, axes=axes)))
    return shaped


def _standardized(x: np.ndarray) -> np.ndarray:
    """Mean 0 and standard deviation 1 per sample."""
    axes = tuple(range(1, x.ndim))
    return (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + 1e-12)
