"""
A Variational Autoencoder in one file: data, models, loss, training, evaluation
and figures, in the order you would read them.

    python vae.py --data_dir ./mnist --epochs 30 --beta 0.5     # train on MNIST
    python vae.py --dataset folder --data_dir ./my_images        # your own images (64x64 RGB)
    python vae.py --conditional                                  # a conditional VAE
    torchrun --standalone --nproc_per_node=4 vae.py              # 4 GPUs, DistributedDataParallel
    python vae.py --help                                         # every flag
    from vae import ConvVAE, vae_loss                            # in your project

A VAE (Kingma & Welling 2013) learns an encoder q(z|x) = N(mu(x), diag(exp(logvar(x))))
and a decoder p(x|z) by maximising the evidence lower bound (ELBO) on log p(x):

    log p(x) >= ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),   p(z) = N(0, I)

We minimise loss = recon + beta * kl, with recon = -E_q[log p(x|z)] estimated from one
sample of z, and kl in closed form. beta = 1 is the plain ELBO; beta != 1 is the
beta-VAE of Higgins et al. (2017). Every number is in nats per image.

Measured (details and commands in README.md):
    python vae.py --epochs 30 --beta 0.5      test loss 84.17 nats/image
        2-core AMD EPYC CPU, torch 2.14.1: 9 min 5 s (17.8 s per epoch)
        NVIDIA H100, torch 2.11: 10.3 s of epochs (0.31-0.33 s each, one CUDA graph per step)
    python vae.py --epochs 30 --binarize --nll_samples 1000
        test NLL 89.32 nats/image (0.164 bits/dim), H100, 8 s of epochs + 2 s for the NLL
    python vae.py --dataset folder --data_dir flowers --latent_dim 128 --epochs 100
        3,670 flower photos at 3x64x64: test loss 6721.5 nats/image, 2-core CPU, 9.5 s per epoch

References
    Kingma & Welling, "Auto-Encoding Variational Bayes", 2013, arXiv:1312.6114
    Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained
        Variational Framework", ICLR 2017
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2015, arXiv:1509.00519
    Sohn, Lee & Yan, "Learning Structured Output Representation using Deep Conditional
        Generative Models", NeurIPS 2015 (the conditional VAE)
"""

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision.transforms import functional as TF
from torchvision.utils import make_grid, save_image
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input or environment, reported as one sentence.

    `main` prints the message without a traceback and exits with `exit_code`:
    2 for bad input (the argparse convention), 3 when training diverged
    (a non-finite loss or gradient), 128 + the signal's number when stopped by
    SIGINT (130) or SIGTERM (143).
    """

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------
# Data
#
# A split is small enough to hold whole (MNIST is 60,000 + 10,000 images of 28x28
# bytes, 55 MB; the 3,670 Flowers photos at 64x64 RGB 45 MB), so each split is held once
# as a uint8 tensor on the training device and batched by indexing it with a
# shuffled index. That removes the per-image Python work of a DataLoader, which
# dominates a VAE's epoch time on a GPU. Bytes become floats in [0, 1] one batch
# at a time, which keeps the resident copy 4x smaller than float32. Every
# conversion (channels, size) happens once, here, never in the training loop.
#
# Two sources: the datasets torchvision knows (their files, their layout), and
# any folder of images, read with torchvision's ImageFolder listing and PIL.

# name -> (torchvision class, its channels) of the datasets torchvision downloads
TORCHVISION_DATASETS = {
    "mnist": (datasets.MNIST, 1),
    "fashion-mnist": (datasets.FashionMNIST, 1),
    "kmnist": (datasets.KMNIST, 1),
    "cifar10": (datasets.CIFAR10, 3),
}
DATASETS = (*TORCHVISION_DATASETS, "folder")
FOLDER_DEFAULTS = (3, 64)  # channels and side of --dataset folder unless --channels / --image_size say otherwise
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def dataset_files(name, data_dir):
    """(folder, file names) that torchvision reads for dataset `name` under data_dir."""
    cls = TORCHVISION_DATASETS[name][0]
    if name == "cifar10":
        return (os.path.join(data_dir, cls.base_folder),
                [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]])
    return os.path.join(data_dir, cls.__name__, "raw"), [os.path.splitext(f)[0] for f, _ in cls.resources]


def load_torchvision(name, data_dir, image_size=None, channels=None):
    """Read one of TORCHVISION_DATASETS, downloading it only when its files are missing.

    Args:
        name: 'mnist', 'fashion-mnist', 'kmnist' or 'cifar10'.
        data_dir: folder that holds (or will hold) the files in torchvision's layout,
            e.g. `MNIST/raw/<the four IDX files>` or `cifar-10-batches-py/`.
        image_size: side S in pixels; None keeps the dataset's own (28 or 32).
        channels: 1 or 3; None keeps the dataset's own (1, or 3 for cifar10).

    Returns:
        dict with `train_x` (N, C, S, S) uint8, `train_y` (N,) int64, `test_x`,
        `test_y` likewise, and `classes`, the class names, all on the CPU.

    Raises:
        UserError: the files are missing and cannot be downloaded, or cannot be read.
    """
    cls, native_channels = TORCHVISION_DATASETS[name]
    folder, files = dataset_files(name, data_dir)
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        _download(name, data_dir, folder, files)
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(data_dir, train=train, download=False)
        except Exception as e:  # a truncated or corrupt file fails inside torchvision
            raise UserError(f"cannot read the {cls.__name__} files in '{folder}' ({type(e).__name__}: {e}); "
                            f"replace them with the original files.") from None
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C) -> (N, C, H, W)
        x = convert_channels(x, channels or native_channels)
        if image_size and image_size != x.shape[-1]:
            x = resize_images(x, image_size)
        out[f"{split}_x"], out[f"{split}_y"] = x.contiguous(), torch.as_tensor(ds.targets).long()
    out["classes"] = list(ds.classes)
    return out


def load_mnist(data_dir, image_size=28):
    """MNIST as `load_torchvision('mnist', data_dir, image_size)` returns it."""
    return load_torchvision("mnist", data_dir, image_size)


def _download(name, data_dir, folder, files):
    # torchvision prints every mirror it tries; keep the user's terminal to one sentence.
    cls = TORCHVISION_DATASETS[name][0]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            for train in (True, False):
                cls(data_dir, train=train, download=True)
            return
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = lines[-1] if lines else type(e).__name__
    where = os.path.relpath(folder, data_dir)
    how = "extracted from cifar-10-python.tar.gz" if name == "cifar10" else "uncompressed"
    raise UserError(f"{cls.__name__} is not in '{folder}' and could not be downloaded ({reason}); put the "
                    f"{len(files)} files {', '.join(files)} ({how}) in that folder, or point --data_dir "
                    f"at a folder whose {where}/ has them.")


def convert_channels(x, channels):
    """uint8 images (N, C, H, W) with C in {1, 3} -> (N, channels, H, W) uint8: grayscale
    repeated into RGB, or RGB to luma with PIL's weights (ITU-R 601-2)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if x.shape[1] == 3 and channels == 1:
        return torch.cat([TF.rgb_to_grayscale(chunk) for chunk in x.split(4096)])
    raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")


def resize_images(x, image_size):
    """Resize uint8 images (N, C, H, W) to (N, C, image_size, image_size), still uint8
    (bilinear with antialiasing, in chunks so that the float copy stays small)."""
    def resize(chunk):
        y = F.interpolate(chunk.float() / 255, size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)
        return (y * 255).round_().clamp_(0, 255).to(torch.uint8)
    return torch.cat([resize(chunk) for chunk in x.split(4096)])


def available_memory():
    """Bytes of memory this process could still allocate: Linux's MemAvailable, else the
    free physical pages; None when neither can be read (then nothing is refused)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_memory(n_images, channels, image_size, what):
    """Refuse (UserError) to load n_images of (channels, image_size, image_size) bytes when
    they would take more than 80% of the available memory, rather than be killed midway."""
    need, free = n_images * channels * image_size ** 2, available_memory()
    if free is not None and need > 0.8 * free:
        raise UserError(f"{what}: {n_images:,} images of {channels}x{image_size}x{image_size} need "
                        f"{need / 1e9:.1f} GB of memory as bytes, and {free / 1e9:.1f} GB is available; "
                        f"use a smaller --image_size, --channels 1, or fewer images.")


FOLDER_SPLIT_SEED = 0  # one fixed test split of a folder for every run, whatever --seed
FOLDER_TEST_FRACTION = 0.1


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, except that hidden folders (.ipynb_checkpoints, .git) are not classes."""

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        return classes, {c: i for i, c in enumerate(classes)}


def list_images(root):
    """The images under `root`: (paths, labels or None, class names or None).

    With subfolders, each is a class, in torchvision's ImageFolder layout
    (`root/<class>/**/<image>`, classes sorted by name, files outside them and
    hidden folders ignored); without, the images directly in `root` are one
    unlabelled set.
    """
    if any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(root)):
        try:
            ds = _ImageFolder(root, allow_empty=True)
        except OSError as e:
            raise UserError(f"cannot list the images in '{root}' ({e}).") from None
        return [p for p, _ in ds.samples], [c for _, c in ds.samples], ds.classes
    paths = sorted(entry.path for entry in os.scandir(root)
                   if entry.is_file() and entry.name.lower().endswith(datasets.folder.IMG_EXTENSIONS))
    return paths, None, None


def load_image(path, image_size, channels):
    """One image file -> (channels, image_size, image_size) uint8: converted to RGB or
    grayscale, its shorter side resized to image_size (antialiased), centre-cropped.

    Raises:
        UserError: naming the file, when PIL cannot read it.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")  # also palette, alpha and 16-bit images
        im = TF.center_crop(TF.resize(im, image_size, antialias=True), image_size)
        return TF.pil_to_tensor(im)
    except Exception as e:  # PIL raises many types for a broken file
        raise UserError(f"cannot read the image '{path}' ({type(e).__name__}: {e}); remove or replace "
                        f"that file.") from None


def load_folder(data_dir, image_size=None, channels=None):
    """Read a folder of images into memory, once, as uint8 tensors.

    Layout: class subfolders (labels used by the class figures and --conditional)
    or a flat folder of images (no labels). When data_dir has `train/` and `val/`
    (or `test/`) subfolders they are the two splits; otherwise a fixed random 10%
    (seed FOLDER_SPLIT_SEED, the same for every run) is the test split.

    Args:
        data_dir: the folder. Formats: those of torchvision's IMG_EXTENSIONS.
        image_size: side S (default FOLDER_DEFAULTS[1] = 64); see `load_image`.
        channels: 3 (RGB, the default) or 1 (grayscale).

    Returns:
        dict with `train_x`, `test_x` (N, C, S, S) uint8, `train_y`, `test_y` (N,)
        int64 or None, `classes` (names) or None, and `note`, a sentence for the
        log describing the split, all on the CPU.

    Raises:
        UserError: no such folder, no images, a test class the training split lacks,
            not enough memory (checked before loading), an unreadable file (named).
    """
    channels, image_size = channels or FOLDER_DEFAULTS[0], image_size or FOLDER_DEFAULTS[1]
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir '{data_dir}' is not a folder; --dataset folder needs a folder of images "
                        f"(class subfolders, or images directly in it).")
    test_name = next((d for d in ("val", "test") if os.path.isdir(os.path.join(data_dir, d))), None)
    if os.path.isdir(os.path.join(data_dir, "train")) and test_name:
        train_paths, train_y, classes = list_images(os.path.join(data_dir, "train"))
        test_paths, test_y, test_classes = list_images(os.path.join(data_dir, test_name))
        if (classes is None) != (test_classes is None) or not set(test_classes or ()) <= set(classes or ()):
            raise UserError(f"'{data_dir}/{test_name}' has classes {test_classes} that do not match "
                            f"those of '{data_dir}/train', {classes}.")
        if classes is not None:  # class indices follow the training split's names
            test_y = [classes.index(test_classes[c]) for c in test_y]
        note = f"splits: {data_dir}/train and {data_dir}/{test_name}"
    else:
        root = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
        paths, labels, classes = list_images(root)
        if len(paths) < 2:
            raise UserError(f"'{root}' holds {len(paths)} images in formats vae.py reads "
                            f"({', '.join(datasets.folder.IMG_EXTENSIONS)}); it needs at least 2.")
        g = torch.Generator().manual_seed(FOLDER_SPLIT_SEED)
        order = torch.randperm(len(paths), generator=g).tolist()
        n_test = max(1, round(FOLDER_TEST_FRACTION * len(paths)))
        test_i, train_i = order[:n_test], order[n_test:]
        train_paths, test_paths = [paths[i] for i in train_i], [paths[i] for i in test_i]
        train_y = None if labels is None else [labels[i] for i in train_i]
        test_y = None if labels is None else [labels[i] for i in test_i]
        note = (f"no train/ and val/ (or test/) subfolders in '{data_dir}', so a fixed random "
                f"{FOLDER_TEST_FRACTION:.0%} of its images (seed {FOLDER_SPLIT_SEED}) is the test split")
    for split, paths in (("training", train_paths), ("test", test_paths)):
        if not paths:
            raise UserError(f"the {split} split of '{data_dir}' has no images in formats vae.py reads "
                            f"({', '.join(datasets.folder.IMG_EXTENSIONS)}).")
    check_memory(len(train_paths) + len(test_paths), channels, image_size, f"'{data_dir}'")
    out = dict(classes=classes, note=note + ("" if classes else "; no class subfolders, so no labels"))
    for split, paths, labels in (("train", train_paths, train_y), ("test", test_paths, test_y)):
        x = torch.empty(len(paths), channels, image_size, image_size, dtype=torch.uint8)
        load = functools.partial(load_image, image_size=image_size, channels=channels)
        # PIL decodes outside the GIL, so threads decode several files at once.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            try:
                for i, image in enumerate(tqdm(pool.map(load, paths), total=len(paths), leave=False, unit="image",
                                               desc=f"reading {split}", disable=not sys.stderr.isatty())):
                    x[i] = image
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a bad file stops the reading now, not after the rest
                raise
        out[f"{split}_x"] = x
        out[f"{split}_y"] = None if labels is None else torch.tensor(labels, dtype=torch.long)
    return out


def load_dataset(dataset, data_dir, image_size=None, channels=None):
    """Load `dataset` (one of DATASETS) with `load_torchvision` or `load_folder`.

    Returns their dict, with `classes` and `train_y` / `test_y` None for unlabelled
    images, and `note` a sentence for the log (or None).
    """
    if dataset == "folder":
        return load_folder(data_dir, image_size, channels)
    return dict(load_torchvision(dataset, data_dir, image_size, channels), note=None)


def to_float(x_uint8):
    """uint8 images in [0, 255] -> float32 in [0, 1], same shape."""
    return x_uint8.float().div_(255)


TEST_BINARIZE_SEED = 0  # one fixed binary test set for every run and every evaluation


def binarize_once(images, seed=TEST_BINARIZE_SEED):
    """Sample each pixel of uint8 images (N, C, H, W) as Bernoulli(intensity) with a fixed
    seed, on the CPU so that every device gets the same set: uint8 in {0, 255}, same shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(to_float(images.cpu()), generator=g).to(torch.uint8) * 255


# ----------------------------------------------------------------------------
# Models
#
# Both models share one interface, the one of pytorch/examples' vae:
#   encode(x) -> (mu, logvar)        x: (B, C, H, W) in [0, 1]; mu, logvar: (B, latent_dim)
#   reparameterize(mu, logvar) -> z  z: (B, latent_dim)
#   decode(z) -> x_hat               x_hat: (B, C, H, W) in [0, 1]
#   forward(x) -> (x_hat, mu, logvar)
#   sample(n) -> (n, C, H, W) images decoded from z ~ N(0, I)
# A conditional VAE (num_classes > 0) takes the class labels y as well, in each
# of them: encode(x, y), decode(z, y), forward(x, y), sample(n, y).
# The decoder's last layer outputs logits; the loss uses them directly, because
# binary cross-entropy computed from a sigmoid that has rounded to 0 or 1 is
# clipped and its gradient lost. `decode` applies the sigmoid for the user.


# exp(logvar) overflows float32 and bfloat16 above logvar = 88, and one diverging
# step can get there; sigma = exp(logvar / 2) then spans 3e-7 to 2e4, far beyond any
# posterior a sane run reaches (MNIST's sit between 0.05 and 1), so the clamp only
# acts on a run that is already going wrong, and turns an overflow into a gradient of 0.
LOGVAR_RANGE = (-30.0, 20.0)


class VAE(nn.Module):
    """Shared VAE logic; a subclass builds `encoder`, `fc_mu`, `fc_logvar`, `decoder`.

    `encoder` maps (B, C, H, W) to features (B, F); `fc_mu` and `fc_logvar` map
    those to (B, latent_dim); `decoder` maps z (B, latent_dim) to logits (B, C, H, W).

    With num_classes = K > 0 it is a conditional VAE (Sohn, Lee & Yan 2015,
    "Learning Structured Output Representation using Deep Conditional Generative
    Models", Sec. 3): the encoder q(z|x, y) and the decoder p(x|z, y) both see the
    one-hot label y, appended to the encoder's features (fc_mu and fc_logvar take
    F + K inputs) and to z (the decoder takes latent_dim + K). The prior stays
    N(0, I). Since the decoder is told the class, z is free to encode everything
    else (style: slant, thickness), and sampling with a chosen y draws that class.
    Labels y are (B,) int64 class indices, or (B, K) floats (one-hot or a mixture,
    e.g. to interpolate between classes). An unconditional model ignores y.
    """

    def __init__(self, image_size, channels, latent_dim, num_classes=0):
        super().__init__()
        if channels < 1 or latent_dim < 1 or num_classes < 0:
            raise ValueError(f"channels and latent_dim must be positive and num_classes >= 0, got "
                             f"{channels}, {latent_dim} and {num_classes}")
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.num_classes = num_classes

    def with_label(self, h, y):
        """Append the one-hot label to h: (B, F) -> (B, F + num_classes); h itself when unconditional.

        Raises:
            ValueError: a conditional model was not given y.
        """
        if not self.num_classes:
            return h
        if y is None:
            raise ValueError("this conditional VAE needs the class labels y")
        onehot = F.one_hot(y, self.num_classes) if y.dtype == torch.long else y  # (B, K)
        return torch.cat([h, onehot.to(h.dtype)], dim=1)

    def encode(self, x, y=None):
        """x: (B, C, H, W) in [0, 1] -> mu: (B, latent_dim) real; logvar: (B, latent_dim) in LOGVAR_RANGE."""
        h = self.with_label(self.encoder(x), y)  # (B, F + K)
        return self.fc_mu(h), self.fc_logvar(h).clamp(*LOGVAR_RANGE)

    def reparameterize(self, mu, logvar):
        """Draw z ~ N(mu, exp(logvar)) as z = mu + sigma * eps, eps ~ N(0, I).

        Written this way (Kingma & Welling 2013, Sec. 2.4) z is a differentiable
        function of mu and logvar, so gradients reach the encoder. It samples in
        eval mode too: the test ELBO is an expectation over q(z|x).
        mu, logvar, z: (B, latent_dim).
        """
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + std * eps

    def decode_logits(self, z, y=None):
        """z: (B, latent_dim) -> logits (B, C, H, W) of p(x|z); sigmoid gives pixel means."""
        return self.decoder(self.with_label(z, y))  # (B, latent_dim + K) -> (B, C, H, W)

    def decode(self, z, y=None):
        """z: (B, latent_dim) -> x_hat: (B, C, H, W) in [0, 1], the mean of p(x|z)."""
        return torch.sigmoid(self.decode_logits(z, y))

    def forward(self, x, y=None, return_logits=False):
        """x: (B, C, H, W) in [0, 1] (and labels y for a conditional model) -> (x_hat, mu, logvar).

        x_hat is (B, C, H, W) in [0, 1], decoded from one sample z ~ q(z|x); with
        `return_logits=True` it is the decoder's logits instead, which is what
        `vae_loss` takes.
        """
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar)
        logits = self.decode_logits(z, y)
        return (logits if return_logits else torch.sigmoid(logits)), mu, logvar

    @torch.no_grad()
    def sample(self, n, y=None, generator=None):
        """Decode n draws from the prior z ~ N(0, I) (with labels y (n,) if conditional):
        (n, C, H, W) in [0, 1], no gradient."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z, y)


class ConvVAE(VAE):
    """Convolutional VAE whose depth follows the image size.

    Encoder: blocks of Conv2d(kernel 4, stride 2) + BatchNorm2d + LeakyReLU, each
    halving the side, until the side is 7 or less or odd (28 -> 14 -> 7; 32 -> 16 -> 8
    -> 4; 64 -> ... -> 4), with 32, 64, 128, 256 channels; then two linear heads
    for mu and logvar. Decoder: the mirror image, a linear layer, a reshape, and
    ConvTranspose2d blocks that double the side back, ending in logits.

    Args:
        image_size: side H = W in pixels; a multiple of 4, at least 16.
        channels: C, 1 (grayscale) or 3 (RGB); any positive number works.
        latent_dim: size of z.
        base_channels: channels of the first block, doubled per block up to 256.
        num_classes: K > 0 makes it a conditional VAE (see `VAE`).

    Raises:
        ValueError: image_size is not a multiple of 4 or is under 16.
    """

    def __init__(self, image_size=28, channels=1, latent_dim=32, base_channels=32, num_classes=0):
        super().__init__(image_size, channels, latent_dim, num_classes)
        if image_size < 16 or image_size % 4:
            raise ValueError(f"ConvVAE needs an image_size that is a multiple of 4 and at least 16, "
                             f"got {image_size}")
        side, widths = image_size, []
        while side % 2 == 0 and side > 7:  # at least twice, since image_size % 4 == 0
            side //= 2
            widths.append(min(base_channels * 2 ** len(widths), 256))
        self.feature_shape = (widths[-1], side, side)
        features = math.prod(self.feature_shape)

        enc, c_in = [], channels
        for w in widths:
            enc += [nn.Conv2d(c_in, w, 4, stride=2, padding=1, bias=False),  # (B, w, S/2, S/2)
                    nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            c_in = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())  # (B, w_last * side * side)
        self.fc_mu = nn.Linear(features + num_classes, latent_dim)
        self.fc_logvar = nn.Linear(features + num_classes, latent_dim)

        dec = [nn.Linear(latent_dim + num_classes, features), nn.LeakyReLU(0.2),
               nn.Unflatten(1, self.feature_shape)]  # (B, w_last, side, side)
        for w_in, w_out in zip(widths[::-1], widths[-2::-1]):
            dec += [nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1, bias=False),  # side x 2
                    nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2)]
        dec += [nn.ConvTranspose2d(widths[0], channels, 4, stride=2, padding=1)]  # logits (B, C, H, W)
        self.decoder = nn.Sequential(*dec)


class MLPVAE(VAE):
    """Fully connected VAE: D -> 512 -> 256 -> latent_dim and back, D = C * H * W.

    Args:
        image_size: side H = W in pixels, any positive number.
        channels: C.
        latent_dim: size of z.
        hidden: widths of the encoder's hidden layers; the decoder uses them reversed.
        num_classes: K > 0 makes it a conditional VAE (see `VAE`).
    """

    def __init__(self, image_size=28, channels=1, latent_dim=32, hidden=(512, 256), num_classes=0):
        super().__init__(image_size, channels, latent_dim, num_classes)
        d = channels * image_size * image_size
        enc, n_in = [nn.Flatten()], d  # (B, C, H, W) -> (B, D)
        for h in hidden:
            enc += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(n_in + num_classes, latent_dim)
        self.fc_logvar = nn.Linear(n_in + num_classes, latent_dim)
        dec, n_in = [], latent_dim + num_classes
        for h in reversed(hidden):
            dec += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        dec += [nn.Linear(n_in, d), nn.Unflatten(1, (channels, image_size, image_size))]  # logits
        self.decoder = nn.Sequential(*dec)


MODELS = {"conv": ConvVAE, "mlp": MLPVAE}


def build_model(model, image_size, channels, latent_dim, width=32, num_classes=0):
    """Build a ConvVAE ('conv') or MLPVAE ('mlp'); raises ValueError for an unknown name.

    width sets the model's size: the ConvVAE's first block has `width` channels,
    the MLPVAE's hidden layers 16 * width and 8 * width units (512 and 256 at 32).
    num_classes > 0 makes a conditional VAE.
    """
    if model == "conv":
        return ConvVAE(image_size, channels, latent_dim, base_channels=width, num_classes=num_classes)
    if model == "mlp":
        return MLPVAE(image_size, channels, latent_dim, hidden=(16 * width, 8 * width), num_classes=num_classes)
    raise ValueError(f"unknown model '{model}', expected one of {sorted(MODELS)}")


# ----------------------------------------------------------------------------
# Loss
#
# Reduction, said once: each term is summed over pixels (recon) or latent
# dimensions (kl), giving nats per image, then averaged over the batch. Averaging
# the reconstruction per pixel instead would shrink it 784-fold against the KL,
# which is how VAEs end up with an unexplained tiny KL weight.


def kl_per_dimension(mu, logvar):
    """KL(N(mu_j, exp(logvar_j)) || N(0, 1)) for each latent dimension j, in nats.

    Kingma & Welling (2013), Appendix B, for a diagonal Gaussian q and p(z) = N(0, I):
        -KL_j = 0.5 * (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
    hence the minus sign in front: each KL_j is >= 0, and 0 exactly when
    mu_j = 0 and logvar_j = 0.

    mu, logvar: (B, latent_dim) -> (B, latent_dim).
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu, logvar):
    """KL(q(z|x) || p(z)) in closed form, in nats per image: (B, latent_dim) -> (B,)."""
    return kl_per_dimension(mu, logvar).sum(-1)


def reconstruction_loss(recon_logits, x, recon="bce"):
    """-log p(x|z) for one z, in nats per image: (B, C, H, W) logits and x -> (B,).

    recon='bce': Bernoulli likelihood with mean sigmoid(logits), for x in [0, 1]
        (Kingma & Welling 2013, Appendix C.1), from the logits for stability. It is
        a normalised likelihood only for binary x (see --binarize).
    recon='mse': Gaussian with mean sigmoid(logits) and unit variance, dropping the
        constant 0.5 * log(2 pi) per pixel, so 0.5 * squared error.

    Raises:
        ValueError: recon is neither 'bce' nor 'mse'.
    """
    logits = recon_logits.float()  # under autocast, keep the sum over pixels in fp32
    if recon == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif recon == "mse":
        per_pixel = 0.5 * (torch.sigmoid(logits) - x).pow(2)
    else:
        raise ValueError(f"recon must be 'bce' or 'mse', got '{recon}'")
    return per_pixel.flatten(1).sum(1)  # (B, C*H*W) -> (B,)


def vae_loss(recon_logits, x, mu, logvar, beta=1.0, recon="bce", free_bits=0.0):
    """The negative (beta-)ELBO and its parts, each averaged over the batch.

        loss = recon + beta * kl        (Kingma & Welling 2013, eq. 10; Higgins et al. 2017, eq. 4)

    With free_bits = L > 0 the KL term of the loss becomes sum_j max(L, KL_j), KL_j
    the batch mean of dimension j's KL (Kingma et al. 2016, arXiv:1606.04934, eq. 15):
    a dimension under L nats gets no gradient pushing it towards the prior, which
    keeps latent dimensions from collapsing early. The returned kl stays the true KL.

    Args:
        recon_logits: (B, C, H, W) decoder logits, `model(x, return_logits=True)[0]`;
            not the [0, 1] images that `model(x)` returns.
        x: (B, C, H, W) targets in [0, 1].
        mu, logvar: (B, latent_dim) from `model.encode`.
        beta: weight of the KL term, >= 0 (a float or a 0-dim tensor); 1 gives the
            plain negative ELBO.
        recon: 'bce' or 'mse', see `reconstruction_loss`.
        free_bits: L >= 0, nats per latent dimension.

    Returns:
        (loss, recon, kl): scalar tensors in nats per image; loss == recon + beta * kl
        when free_bits is 0.
    """
    rec = reconstruction_loss(recon_logits, x, recon).mean()
    kl_dims = kl_per_dimension(mu.float(), logvar.float()).mean(0)  # (latent_dim,) batch means
    kl = kl_dims.sum()
    kl_term = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return rec + beta * kl_term, rec, kl


# ----------------------------------------------------------------------------
# Evaluation
#
# Two measures of a trained VAE on the test split. `evaluate` gives the
# single-sample ELBO, cheap enough for every epoch, and what the latent space
# uses (active units). `log_likelihood` gives the field's number, an importance-
# weighted estimate of log p(x) that tightens towards it as K grows.

def in_eval_mode(fn):
    """Decorator for a function whose first argument is a model: it runs in eval mode
    (BatchNorm on its running statistics) without gradients, and the model gets its
    train/eval mode back afterwards, whatever happens."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2015), Sec. 5.2: Cov_x(E_q[z_u]) > 0.01


@in_eval_mode
def evaluate(model, images, beta=1.0, recon="bce", batch_size=1000, amp=False, labels=None, all_reduce=False):
    """Average loss, recon and KL over a split, in eval mode, with z sampled.

    The test loss is the true single-sample estimate of the negative (beta-)ELBO
    (z drawn from q(z|x), not z = mu), so it is comparable with the training loss.

    Args:
        images: (N, C, H, W) uint8 on the model's device.
        amp: run the model under bf16 autocast (the loss is summed in fp32).
        labels: (N,) int64 on the model's device, for a conditional model.
        all_reduce: each process of a distributed run holds a share of the split;
            the sums are added over all processes, so every process returns the
            whole split's numbers.

    Returns:
        dict: loss, recon, kl (nats per image), mu_mean, logvar_mean (means over
        images and latent dimensions), active_units (dimensions u whose mean mu_u
        varies across images with variance > 0.01), and kl_per_dim, a list of
        latent_dim floats (nats per image).
    """
    d = model.latent_dim
    sums = torch.zeros(5, device=images.device)  # summed on the device, read once
    dims = torch.zeros(3, d, device=images.device)  # per dimension: sum mu, sum mu^2, sum KL
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size])
        y = None if labels is None else labels[start:start + batch_size]
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            logits, mu, logvar = model(x, y, return_logits=True)
        mu, logvar = mu.float(), logvar.float()
        loss, rec, kl = vae_loss(logits, x, mu, logvar, beta, recon)
        sums += torch.stack([loss, rec, kl, mu.mean(), logvar.mean()]) * len(x)
        dims += torch.stack([mu.sum(0), mu.pow(2).sum(0), kl_per_dimension(mu, logvar).sum(0)])
    n = len(images)
    if all_reduce:
        count = torch.tensor([float(n)], device=images.device)
        for t in (sums, dims, count):
            dist.all_reduce(t)  # sum over the processes' shares
        n = int(count.item())
    loss, rec, kl, mu_mean, logvar_mean = (sums / n).tolist()
    mu_var = dims[1] / n - (dims[0] / n).pow(2)  # Cov_x(E_q[z_u]) for each u
    return dict(loss=loss, recon=rec, kl=kl, mu_mean=mu_mean, logvar_mean=logvar_mean,
                active_units=int((mu_var > ACTIVE_UNIT_THRESHOLD).sum()), kl_per_dim=(dims[2] / n).tolist())


@torch.no_grad()
def log_likelihood(model, x, k, max_decodes=4096, log_px_given_z=None, y=None):
    """Importance-weighted estimate of log p(x), in nats per image (Burda et al. 2015, eq. 8).

        log p(x) ~= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x)

    computed with logsumexp over k for stability. K = 1 is the single-sample ELBO;
    the estimate's expectation rises with K towards log p(x) (Burda et al., Thm. 1).
    The K samples are decoded in chunks of at most `max_decodes` images, so memory
    stays bounded whatever K.

    Args:
        model: a VAE (any object with `encode`, `decode_logits`, `latent_dim`).
        x: (B, C, H, W) in [0, 1]; binary for a true Bernoulli likelihood.
        k: number of importance samples, >= 1.
        log_px_given_z: function (logits (N, C, H, W), x (N, C, H, W)) -> (N,) giving
            log p(x|z); default the Bernoulli log-likelihood, -reconstruction_loss(bce).
        y: (B,) labels for a conditional model, whose estimate is then of log p(x|y).

    Returns:
        (B,) estimates of log p(x) in nats (negative numbers; the NLL is minus them).
    """
    if log_px_given_z is None:
        log_px_given_z = lambda logits, target: -reconstruction_loss(logits, target, "bce")  # noqa: E731
    b = len(x)
    cond = () if y is None else (y,)  # so that any model with encode(x) and decode_logits(z) works
    mu, logvar = model.encode(x, *cond)  # (B, D)
    mu, logvar = mu.float(), logvar.float()
    std = torch.exp(0.5 * logvar)
    log_2pi = math.log(2 * math.pi)
    chunk = max(1, max_decodes // b)
    log_w = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn(n, b, model.latent_dim, device=x.device)
        z = mu + std * eps  # (n, B, D)
        logits = model.decode_logits(z.flatten(0, 1), *(c.repeat(n) for c in cond))  # (n*B, C, H, W)
        log_px_z = log_px_given_z(logits, x.repeat(n, 1, 1, 1)).view(n, b)
        log_pz = -0.5 * (z.pow(2) + log_2pi).sum(-1)  # log N(z; 0, I), (n, B)
        log_qz = -0.5 * (eps.pow(2) + logvar + log_2pi).sum(-1)  # log N(z; mu, sigma^2), (n, B)
        log_w.append(log_px_z + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)  # (B,)


@in_eval_mode
def evaluate_nll(model, images, k, batch_size=100, labels=None):
    """Mean -log p(x) over a split by `log_likelihood` with K samples: (nats per image, bits per dim).

    images: (N, C, H, W) uint8 on the model's device, binary ({0, 255}) for the
    standard protocol; labels: (N,) on that device, for a conditional model (whose
    number is then -log p(x|y)). Bits per dimension = nats / (C * H * W * ln 2).
    """
    total = torch.zeros((), device=images.device)
    for start in range(0, len(images), batch_size):
        y = None if labels is None else labels[start:start + batch_size]
        total += log_likelihood(model, to_float(images[start:start + batch_size]), k, y=y).sum()
    nll = -total.item() / len(images)
    return nll, nll / (images[0].numel() * math.log(2))


# ----------------------------------------------------------------------------
# Figures
#
# Image grids come from torchvision; the loss curves from matplotlib's object API
# (no pyplot), so that importing or running this never changes a caller's
# matplotlib backend.


@in_eval_mode
def save_reconstructions(model, x, path, y=None):
    """Save originals (top row) above their reconstructions (bottom row).

    x: (n, C, H, W) in [0, 1]; y: (n,) labels for a conditional model. The
    reconstruction decodes the posterior mean mu, the model's best single guess,
    rather than a random z.
    """
    x_hat = model.decode(model.encode(x, y)[0], y)
    save_image(torch.cat([x, x_hat]), path, nrow=len(x), padding=2, pad_value=0.5)


@in_eval_mode
def save_samples(model, path, n=64, seed=0):
    """Save an sqrt(n) x sqrt(n) grid of images decoded from z ~ N(0, I) (fixed seed)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    images = model.sample(n, generator=g)
    save_image(images, path, nrow=int(math.sqrt(n)), padding=2, pad_value=0.5)


@in_eval_mode
def save_samples_per_class(model, classes, path, per_class=10, seed=0):
    """For a conditional model: one row per class, each decoding the same `per_class`
    draws z ~ N(0, I) (fixed seed) with that row's label, so that a column holds the
    style z fixed while the class changes. classes: the K class names."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(per_class, model.latent_dim, device=device, generator=g)  # shared by every row
    k = model.num_classes
    y = torch.arange(k, device=device).repeat_interleave(per_class)  # (K * per_class,)
    images = model.decode(z.repeat(k, 1), y)  # (K * per_class, C, H, W)
    images = images.view(k, per_class, *images.shape[1:])
    _grid_figure(images, [str(c) for c in classes], "conditional samples: row = label y, column = one z ~ N(0, I)",
                 path)


@in_eval_mode
def save_interpolation(model, x_a, x_b, path, steps=12, y_a=None, y_b=None):
    """Decode the line from mu(x_a) to mu(x_b) in `steps` points, between x_a and x_b.

    x_a, x_b: (C, H, W) in [0, 1]; y_a, y_b: their labels (ints) for a conditional
    model, whose one-hot labels are interpolated along with z.
    The saved row is x_a, the decoded points, x_b.
    """
    device = x_a.device
    y = None
    if model.num_classes:
        y = F.one_hot(torch.tensor([y_a, y_b], device=device), model.num_classes).float()  # (2, K)
    mu = model.encode(torch.stack([x_a, x_b]), y)[0]  # (2, latent_dim)
    t = torch.linspace(0, 1, steps, device=device).unsqueeze(1)  # (steps, 1)
    z = (1 - t) * mu[0] + t * mu[1]  # (steps, latent_dim)
    y_t = None if y is None else (1 - t) * y[0] + t * y[1]  # (steps, K)
    images = torch.cat([x_a[None], model.decode(z, y_t), x_b[None]])
    save_image(images, path, nrow=len(images), padding=2, pad_value=0.5)


def plot_losses(history, path):
    """Plot total loss, recon and KL per epoch, train and test, to a PNG."""
    from matplotlib.figure import Figure  # imported here: only figure-writing needs it

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(12, 3.5), layout="constrained")
    titles = (f"loss = recon + {history[-1]['beta']:g} * KL", "reconstruction -log p(x|z)", "KL(q(z|x) || p(z))")
    for ax, key, title in zip(fig.subplots(1, 3), ("loss", "recon", "kl"), titles):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", ms=3, label="train")
        ax.plot(epochs, [row[f"test_{key}"] for row in history], "s-", ms=3, label="test")
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


# The latent-space analysis: what the encoder uses, what each dimension means,
# and where the model fails. All of it starts from the test set's posteriors.


@in_eval_mode
def encode_split(model, images, recon="bce", batch_size=1000, labels=None):
    """Posteriors and reconstructions of a whole split, in eval mode, on the CPU.

    images: (N, C, H, W) uint8 on the model's device; labels: (N,) on that device,
    for a conditional model.
    Returns mu, logvar (N, latent_dim); recon_error (N,), -log p(x | z = mu) in nats
    per image (deterministic, unlike the sampled test loss); and x_hat (N, C, H, W)
    uint8, the decoded means.
    """
    out = {"mu": [], "logvar": [], "recon_error": [], "x_hat": []}
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size])
        y = None if labels is None else labels[start:start + batch_size]
        mu, logvar = model.encode(x, y)
        logits = model.decode_logits(mu, y)
        out["mu"].append(mu.float().cpu())
        out["logvar"].append(logvar.float().cpu())
        out["recon_error"].append(reconstruction_loss(logits, x, recon).cpu())
        out["x_hat"].append((torch.sigmoid(logits.float()) * 255).round().to(torch.uint8).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _grid_figure(rows, row_labels, title, path, col_labels=None):
    """Draw rows of images (R, n, C, H, W) in [0, 1] as one grid, each row labelled."""
    from matplotlib.figure import Figure

    r, n = rows.shape[:2]
    grid = make_grid(rows.flatten(0, 1).float().cpu(), nrow=n, padding=2, pad_value=1.0)  # (3, h, w)
    h, w = grid.shape[1:]
    fig = Figure(figsize=(1.5 + w / 50, 0.6 + h / 50), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    side = (h - 2) / r
    ax.set_yticks([2 + side * (i + 0.5) for i in range(r)], row_labels)
    if col_labels is None:
        ax.set_xticks([])
    else:
        step = (w - 2) / n
        ax.set_xticks([2 + step * (i + 0.5) for i in range(n)], col_labels)
    ax.tick_params(length=0)
    ax.set_title(title)
    fig.savefig(path, dpi=100)


def save_latent_distribution(mu, logvar, kl_per_dim, active_units, path):
    """Histograms of mu and sigma over a split against the prior, and each dimension's KL.

    mu, logvar: (N, latent_dim); kl_per_dim: latent_dim floats, nats per image.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 3.8), layout="constrained")
    ax_mu, ax_sigma, ax_kl = fig.subplots(1, 3)
    ax_mu.hist(mu.flatten().numpy(), bins=100, density=True, alpha=0.7, label="mu, all dimensions")
    t = torch.linspace(-4, 4, 200)
    ax_mu.plot(t, torch.exp(-0.5 * t ** 2) / math.sqrt(2 * math.pi), "k", label="prior N(0, 1)")
    ax_mu.set(title="posterior means mu over the test set", xlabel="mu", ylabel="density")
    ax_mu.legend()
    ax_sigma.hist(torch.exp(0.5 * logvar).flatten().numpy(), bins=100, range=(0, 1.2), alpha=0.7,
                  label="sigma, all dimensions")
    ax_sigma.axvline(1.0, color="k", label="prior sigma = 1")
    ax_sigma.set(title="posterior standard deviations sigma", xlabel="sigma", ylabel="count")
    ax_sigma.legend()
    kl = torch.tensor(kl_per_dim)
    order = torch.argsort(kl, descending=True)
    colors = ["C0" if k > 0.01 else "C7" for k in kl[order].tolist()]
    ax_kl.bar(range(len(kl)), kl[order].numpy(), color=colors)
    ax_kl.set_xticks(range(len(kl)), [str(i) for i in order.tolist()], fontsize=6)
    ax_kl.set(title=f"KL per dimension, sorted: {active_units} of {len(kl)} units active",
              xlabel="latent dimension", ylabel="nats per image")
    fig.savefig(path, dpi=100)


@in_eval_mode
def save_traversals(model, x, kl_per_dim, path, n_dims=8, steps=11, span=3.0, y=None):
    """Decode mu(x) with one dimension swept over [-span, span], for the n_dims of highest KL.

    x: (C, H, W) in [0, 1], one image; y: its label (an int) for a conditional model.
    """
    y = None if y is None else torch.tensor([y], device=x.device)
    mu = model.encode(x[None], y)[0][0]  # (D,)
    dims = torch.argsort(torch.tensor(kl_per_dim), descending=True)[:n_dims].tolist()
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu.repeat(len(dims), steps, 1)  # (n_dims, steps, D)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    images = model.decode(z.flatten(0, 1), None if y is None else y.expand(len(dims) * steps))
    images = images.view(len(dims), steps, *x.shape)
    labels = [f"z{d} ({kl_per_dim[d]:.1f} nats)" for d in dims]
    _grid_figure(images, labels, "traversals of the most informative dimensions, from mu of one test image",
                 path, col_labels=[f"{round(v, 1) + 0.0:+.1f}" for v in values.tolist()])


@in_eval_mode
def save_class_means(model, mu, labels, classes, path, per_class=8, noise=0.1, seed=0):
    """Decode, for each class, the mean of its test images' mu plus noise * N(0, I)
    (a conditional model decodes it with that class's label).

    mu: (N, latent_dim) on the CPU; labels: (N,) int; classes: the class names.
    """
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    present = sorted(set(labels.tolist()))
    z = torch.stack([mu[labels == c].mean(0) + noise * torch.randn(per_class, mu.shape[1], generator=g)
                     for c in present])  # (classes, per_class, D)
    y = torch.tensor(present, device=device).repeat_interleave(per_class)
    images = model.decode(z.flatten(0, 1).to(device), y)  # (classes * per_class, C, H, W)
    images = images.view(len(present), per_class, *images.shape[1:])
    with_label = " with the class's label y" if model.num_classes else ""
    _grid_figure(images, [str(classes[c]) for c in present],
                 f"class means of mu + {noise} * N(0, I), decoded{with_label}", path)


def save_latent_pca(mu, labels, classes, path):
    """Scatter the test means projected on their first two principal components, coloured
    by class; labels and classes None (unlabelled images) draw one colour."""
    from matplotlib.figure import Figure

    centered = mu - mu.mean(0)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    proj = centered @ v[:2].T  # (N, 2)
    explained = (s[:2] ** 2 / (s ** 2).sum()).tolist()
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    if labels is None:
        ax.scatter(proj[:, 0], proj[:, 1], s=2, alpha=0.5)
    else:
        for c in sorted(set(labels.tolist())):
            pts = proj[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color=f"C{c % 10}", label=str(classes[c]))
        ax.legend(markerscale=6, title="class", loc="best", fontsize=8)
    ax.set(title="test-set means mu, first two principal components",
           xlabel=f"PC 1 ({explained[0]:.0%} of variance)", ylabel=f"PC 2 ({explained[1]:.0%} of variance)")
    fig.savefig(path, dpi=100)


@in_eval_mode
def save_manifold(model, path, n=20, span=3.0):
    """For latent_dim == 2: decode an n x n grid over [-span, span]^2 (z1 rising rightwards, z2 upwards)."""
    device = next(model.parameters()).device
    values = torch.linspace(-span, span, n, device=device)
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")  # row 0 is the top: largest z2
    images = model.decode(torch.stack([z1.flatten(), z2.flatten()], dim=1))
    save_image(images, path, nrow=n, padding=1, pad_value=0.5)


def save_error_analysis(images, x_hat, recon_error, kl, labels, classes, out_dir, n=16):
    """Per-class error table (returned and written to per_class.csv; none for unlabelled
    images, labels None), error histogram, best and worst reconstructions.

    images, x_hat: (N, C, H, W) uint8 on the CPU; recon_error, kl: (N,) nats per image;
    labels: (N,) int or None; classes: the class names or None.
    """
    from matplotlib.figure import Figure

    rows = []
    for c in sorted(set(labels.tolist())) if labels is not None else ():
        m = labels == c
        rows.append(dict(label=c, name=classes[c], count=int(m.sum()),
                         recon_error=recon_error[m].mean().item(), kl=kl[m].mean().item()))
    if rows:
        save_csv(rows, os.path.join(out_dir, "per_class.csv"))

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(recon_error.numpy(), bins=100)
    ax.set(title="reconstruction error per test image", xlabel="-log p(x | z = mu), nats", ylabel="images")
    fig.savefig(os.path.join(out_dir, "recon_error_hist.png"), dpi=100)

    order = torch.argsort(recon_error)
    best, worst = order[:n], order.flip(0)[:n]
    grid = torch.stack([images[best], x_hat[best], images[worst], x_hat[worst]]).float() / 255
    _grid_figure(grid, ["best", "recon", "worst", "recon"],
                 f"best and worst reconstructed test images ({recon_error[best[0]]:.0f} to "
                 f"{recon_error[worst[0]]:.0f} nats)", os.path.join(out_dir, "best_worst.png"))
    return rows


def interpolation_ends(n, test_y, interpolate):
    """Indices (i, j) of the n test images to interpolate between, and a note or None.

    The first test images of classes interpolate = (A, B) when both exist; else of
    the first two classes present; for unlabelled images (test_y None), images 0 and 1
    (0 and 0 when there is one).
    """
    if test_y is None:
        return (0, min(1, n - 1)), None
    first = {}
    for i, c in enumerate(test_y.tolist()):
        first.setdefault(c, i)
    a, b = interpolate
    if a in first and b in first and a != b:
        return (first[a], first[b]), None
    c = sorted(first)[:2]
    ends = (first[c[0]], first[c[-1]] if len(c) > 1 else min(1, len(test_y) - 1))
    return ends, f"note: no test image of class {a} or {b}, so interpolation.png goes from class {c[0]} to {c[-1]}"


def write_analysis(model, test_x, test_y, stats, out_dir, recon="bce", interpolate=(4, 9), seed=0, classes=None):
    """Write every latent-space figure of a trained model into out_dir; returns the per-class rows.

    test_x: (N, C, H, W) uint8 on the model's device; test_y: (N,) labels on the CPU,
    or None for unlabelled images (the class figures are then skipped);
    stats: the dict of `evaluate` on test_x (kl_per_dim, active_units); classes: the
    class names (default: the label numbers).
    """
    conditional = model.num_classes > 0
    y_dev = test_y.to(test_x.device) if conditional else None
    if test_y is not None and classes is None:
        classes = [str(c) for c in range(int(test_y.max()) + 1)]
    enc = encode_split(model, test_x, recon, labels=y_dev)
    if conditional:
        save_samples_per_class(model, classes, os.path.join(out_dir, "samples_per_class.png"), seed=seed)
    else:
        save_samples(model, os.path.join(out_dir, "samples.png"), seed=seed)
    (i, j), note = interpolation_ends(len(test_x), test_y, interpolate)
    if note:
        print(note)
    label = (lambda k: int(test_y[k])) if conditional else (lambda k: None)
    save_interpolation(model, to_float(test_x[i]), to_float(test_x[j]), os.path.join(out_dir, "interpolation.png"),
                       y_a=label(i), y_b=label(j))
    save_latent_distribution(enc["mu"], enc["logvar"], stats["kl_per_dim"], stats["active_units"],
                             os.path.join(out_dir, "latent_distribution.png"))
    save_traversals(model, to_float(test_x[0]), stats["kl_per_dim"], os.path.join(out_dir, "traversals.png"),
                    y=label(0))
    if test_y is None:
        print("note: the images have no class labels, so class_means.png and per_class.csv are not written "
              "and latent_pca.png has one colour")
    else:
        save_class_means(model, enc["mu"], test_y, classes, os.path.join(out_dir, "class_means.png"), seed=seed)
    save_latent_pca(enc["mu"], test_y, classes, os.path.join(out_dir, "latent_pca.png"))
    if model.latent_dim == 2 and not conditional:
        save_manifold(model, os.path.join(out_dir, "manifold.png"))
    kl = kl_divergence(enc["mu"], enc["logvar"])
    return save_error_analysis(test_x.cpu(), enc["x_hat"], enc["recon_error"], kl, test_y, classes, out_dir)


# ----------------------------------------------------------------------------
# Saving and loading
#
# Every file is written to a temporary file in the same folder and moved into
# place, so a crash mid-write leaves the previous complete file, never half of one.


def _atomic_write(path, write):
    """Write a file through `write(f)` to a temporary file, then move it over `path`.

    Raises UserError when the disk is full or the folder unwritable; `path` then
    still holds its previous content.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write '{path}' ({e.strerror or e}); its previous version, if any, is "
                            f"intact: free some space or choose another --out_dir.") from None
        raise


def save_json(obj, path):
    """Write a JSON-serialisable object to path, atomically (UserError if it cannot)."""
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def save_csv(rows, path):
    """Write a list of dicts with the same keys as a CSV with a header, atomically."""
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    _atomic_write(path, write)


def save_checkpoint(path, model, optimizer, epoch, config, history):
    """Save a plain dict, atomically: model and optimizer state, epoch, config, the
    metrics history and the random number generators' states (CPU, and each CUDA
    device), everything `--resume` needs to continue exactly where the run was."""
    rng = dict(cpu=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                 config=config, history=history, rng=rng)
    _atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path, device="cpu"):
    """Load a checkpoint and rebuild its model: (model on `device`, the checkpoint dict).

    Loads with `torch.load(..., weights_only=True)`, which refuses pickles that
    carry arbitrary Python objects (they could run code when loaded).

    Raises:
        UserError: one sentence for each way it can fail: no file, not a PyTorch
            file, a pickle with objects beyond tensors and plain data, a dict that
            is not this script's checkpoint, a model the weights do not fit.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"there is no checkpoint at '{path}'.") from None
    except IsADirectoryError:
        raise UserError(f"'{path}' is a folder; give the checkpoint file, e.g. '{path}/checkpoint.pt'.") from None
    except Exception as e:  # the unpickler fails in many ways on a file that is not a checkpoint
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # it names code to import and run
            raise UserError(f"'{path}' was refused: it holds Python objects beyond tensors and plain data, "
                            f"which could run code when loaded, and vae.py loads only with "
                            f"weights_only=True.") from None
        raise UserError(f"'{path}' is not a checkpoint written by vae.py (not a PyTorch file, "
                        f"or a truncated one).") from None
    if not isinstance(state, dict) or not {"model", "config", "epoch"} <= set(state):
        raise UserError(f"'{path}' is a PyTorch file but not a checkpoint written by vae.py "
                        f"(it has no model, config and epoch).")
    config = state["config"]
    try:
        model = build_model(config["model"], config["image_size"], config["channels"], config["latent_dim"],
                            config.get("width", 32), config.get("num_classes", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"'{path}' has a config that describes no model vae.py can build ({e}).") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"'{path}' comes from an incompatible model: its weights do not fit the "
                        f"{config['model']} model (image_size {config['image_size']}, latent_dim "
                        f"{config['latent_dim']}, width {config.get('width', 32)}) that its config "
                        f"describes.") from None
    return model.to(device), state


def load_checkpoint(path, device="cpu"):
    """Rebuild the model saved by a training run, in eval mode, for use in other code.

    Returns:
        (model, config): the VAE on `device`, and the run's configuration dict.

    Raises:
        UserError: the file is missing, unsafe or not a checkpoint of this script
            (see `read_checkpoint`).
    """
    model, state = read_checkpoint(path, device)
    return model.eval(), state["config"]


# ----------------------------------------------------------------------------
# Training


def select_device(name, deterministic=False):
    """'auto' -> cuda, then mps, then cpu; a named device must be available (UserError).

    deterministic turns on PyTorch's deterministic algorithms (and off cuDNN's
    autotuner), so that two CUDA runs with the same seed give the same numbers,
    at some cost in speed. On the CPU the run is deterministic without it.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif not available[name]:
        raise UserError(f"--device {name} was asked for but is not available here; "
                        f"use --device auto or cpu.")
    if name == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # fixed shapes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (10-bit mantissa)
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def get_batch(images, idx, binarize=False):
    """images[idx] as floats (B, C, H, W) in [0, 1]; with binarize, each pixel drawn as
    Bernoulli(intensity) afresh on every call (the dynamic binarization of Burda et al. 2015)."""
    x = to_float(images[idx])
    return torch.bernoulli(x) if binarize else x


def train_step(model, optimizer, x, beta, recon="bce", amp=False, free_bits=0.0, grad_clip=0.0, y=None):
    """One Adam step on a batch x (B, C, H, W) in [0, 1] (labels y (B,) for a conditional
    model); see `vae_loss` for the rest.

    grad_clip > 0 rescales the gradient to at most that global L2 norm first.
    Returns the detached tensor [recon + beta * kl, recon, kl, gradient norm] (nats
    per image, batch means; the free-bits floor is in the gradient only), left on
    the device so that the caller decides when to wait for it.
    """
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        logits, mu, logvar = model(x, y, return_logits=True)
    loss, rec, kl = vae_loss(logits, x, mu, logvar, beta, recon, free_bits)  # in fp32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # With max_norm = inf this only measures the norm, which the non-finite check reads.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    return torch.stack([rec + beta * kl, rec, kl, grad_norm]).detach()


class CUDAGraphStep:
    """`train_step` on a full batch of `images[idx]`, captured once as a CUDA graph.

    A VAE for MNIST is so small that on a GPU an eager step is bound by the CPU
    launching its ~100 kernels one at a time, not by the arithmetic. A CUDA graph
    records the kernels of one whole step (batch gather, forward, backward, Adam)
    once, and each call replays them with a single launch ("whole network capture"
    in PyTorch's CUDA Graphs notes). Only the batch's indices and beta change
    between replays: they live in buffers that the graph reads.

    Capture needs a few warm-up steps; they would train the model, so its state
    and the optimizer's are put back afterwards. Adam must be `capturable`.

    Args:
        model, optimizer, recon, amp, free_bits, grad_clip: as for `train_step`.
        images: (N, C, H, W) uint8 on the GPU; labels: (N,) on the GPU, for a conditional model.
        batch_size: B; a call takes exactly B indices.
        binarize: as for `get_batch`.
    """

    def __init__(self, model, optimizer, images, batch_size, recon="bce", amp=False, free_bits=0.0,
                 binarize=False, grad_clip=0.0, labels=None):
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=images.device)
        self.beta = torch.ones((), device=images.device)  # set with .fill_() before replaying

        def step():
            x = get_batch(images, self.idx, binarize)
            y = None if labels is None else labels[self.idx]
            return train_step(model, optimizer, x, self.beta, recon, amp, free_bits, grad_clip, y)

        before = {k: v.clone() for k, v in model.state_dict().items()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        opt_before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.state}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()  # (4,) loss, recon, kl, gradient norm: rewritten by every replay
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(before[k])
            for p in params:
                for k, v in optimizer.state[p].items():
                    v.copy_(opt_before[p][k]) if p in opt_before else v.zero_()  # zero = a fresh Adam

    def __call__(self, idx):
        """idx: (B,) int64 on the GPU -> (4,) [loss, recon, kl, grad norm], valid until the next call."""
        self.idx.copy_(idx)
        self.graph.replay()
        return self.out


class StopTraining(Exception):
    """Raised inside an epoch to stop it: a signal arrived, or a value went non-finite."""

    def __init__(self, step, term=None, values=None, signum=0):
        super().__init__(step, term, values, signum)
        self.step, self.term, self.values, self.signum = step, term, values, signum


class SignalFlag:
    """While active, SIGINT (Ctrl-C) and SIGTERM set `signum` instead of killing the
    process, so that training stops between two steps with the last checkpoint whole.
    A second signal stops at once. Signals can only be caught in the main thread;
    elsewhere this does nothing."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def _handle(self, signum, frame):
        if self.signum:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


STAT_NAMES = ("loss", "reconstruction term", "KL term", "gradient")


def _check_finite(step, stats):
    """Raise StopTraining naming the first non-finite entry of a step's (4,) stats."""
    if not torch.isfinite(stats).all():  # waits for that step only
        bad = [name for name, v in zip(STAT_NAMES, stats.tolist()) if not math.isfinite(v)]
        raise StopTraining(step, bad[1] if len(bad) > 1 else bad[0], stats.tolist())


def train_epoch(model, optimizer, images, batch_size, beta, recon="bce", amp=False, free_bits=0.0,
                binarize=False, grad_clip=0.0, graph=None, stop=None, desc="", labels=None):
    """One pass over `images` (N, C, H, W) uint8 in a random order.

    beta, recon, amp, free_bits, grad_clip: as for `train_step`; binarize: as for
    `get_batch`; labels: (N,) int64 on the images' device, for a conditional model.
    `graph`, a CUDAGraphStep for this model and these settings, replaces
    the eager step for every full batch. `stop`, a SignalFlag, is looked at after
    every step.

    In a distributed run (torch.distributed initialised, W processes, `model`
    wrapped in DistributedDataParallel) every process holds all the images; rank 0's
    shuffled order is broadcast, and each process takes every W-th index of it, as
    DistributedSampler does (padded by repeating the first few so that all get the
    same number), in batches of batch_size / W: one step of the W processes together
    is one batch of batch_size, its gradient averaged by DDP. The epoch's sums are
    added over the processes.

    Each step's loss, recon, KL and gradient norm are checked for a non-finite value,
    and the epoch stops at the first one. The check reads a number from the device,
    which makes the CPU wait for it; it looks at the previous step's numbers once
    the current step is queued, so that a GPU never runs dry (the stop comes one
    step late, and names the step that went wrong). On a CPU it costs nothing.

    Returns the mean loss (recon + beta * kl), recon and KL over the epoch (nats per
    image), summed on the device and read once at the end.

    Raises:
        StopTraining: with `.step` (1-based) and `.term`, the name of the non-finite
            value, or `.signum`, the signal that arrived.
    """
    model.train()
    perm = torch.randperm(len(images), device=images.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.broadcast(perm, src=0)  # one order for all: the shares below must not overlap
        pad = -len(perm) % world  # so that every process gets the same number of steps
        perm = torch.cat([perm, perm[:pad]])[dist.get_rank()::world]  # (ceil(N / W),) this process's share
        batch_size //= world
    n = len(perm)
    sums = torch.zeros(3, device=images.device)
    if graph is not None:
        graph.beta.fill_(beta)
    bar = tqdm(range(0, n, batch_size), desc=desc, leave=False, unit="batch",
               disable=not sys.stderr.isatty())
    pending = None  # (step, stats) of the previous step, checked while this one runs
    for step, start in enumerate(bar, 1):
        idx = perm[start:start + batch_size]
        if graph is not None and len(idx) == batch_size:
            stats = graph(idx).clone()  # the graph's output buffer is rewritten by the next replay
        else:  # eager, also for the last, smaller batch
            x = get_batch(images, idx, binarize)  # (B, C, H, W) in [0, 1]
            y = None if labels is None else labels[idx]
            stats = train_step(model, optimizer, x, beta, recon, amp, free_bits, grad_clip, y)
        sums += stats[:3] * len(idx)
        if pending is not None:
            _check_finite(*pending)
        pending = (step, stats)
        if stop is not None and stop.signum:
            raise StopTraining(step, None, None, stop.signum)
    _check_finite(*pending)
    if world > 1:
        dist.all_reduce(sums)
        n *= world
    loss, rec, kl = (sums / n).tolist()
    return dict(loss=loss, recon=rec, kl=kl)


def beta_schedule(epoch, beta, kl_warmup=0):
    """The KL weight of a 1-based epoch: rising linearly from 0 at epoch 1 to `beta` at
    epoch kl_warmup + 1 and constant after (KL annealing, Bowman et al. 2016, Sec. 3.1)."""
    if kl_warmup <= 0:
        return beta
    return beta * min(1.0, (epoch - 1) / kl_warmup)


def setup_training(model_name, image_size, channels, latent_dim, lr, device, compile=False, width=32,
                   num_classes=0, distributed=False):
    """Build the model on `device` with its fast settings, and its Adam optimizer.

    Returns (model, step_model, optimizer): `step_model` is what the training steps
    call: `model` itself, wrapped in DistributedDataParallel when `distributed`
    (which averages the gradients over the processes during backward), and
    `torch.compile`d when compile is true. They share parameters; save, evaluate
    and plot with `model`, so that the checkpoint loads without either wrapper.
    """
    model = build_model(model_name, image_size, channels, latent_dim, width, num_classes).to(device)
    if model_name == "conv":
        # NHWC weights run the convolutions about 25% faster on CPU (oneDNN) and on
        # tensor-core GPUs; the state dict and the results are the same.
        model = model.to(memory_format=torch.channels_last)
    # Fused Adam updates every parameter in one kernel instead of a dozen per tensor;
    # capturable keeps its step count on the GPU, so a CUDA graph can record it.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cuda", "cpu"),
                                 capturable=device.type == "cuda")
    step_model = model
    if distributed:  # copies rank 0's weights and buffers to every process
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if compile:
        step_model = torch.compile(step_model)
    return model, step_model, optimizer


def init_distributed(device):
    """Join the process group when started by torchrun; returns (rank, world_size, device).

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each
    process it starts; without them this returns (0, 1, device) and nothing changes.
    Backend: nccl on CUDA, each process on its own GPU (cuda:LOCAL_RANK); gloo on CPU.

    Raises:
        UserError: started on an MPS device, or with more processes per machine than GPUs.
    """
    if "LOCAL_RANK" not in os.environ:
        return 0, 1, device
    if device.type == "mps":
        raise UserError("torchrun needs --device cuda or cpu: PyTorch has no distributed backend for mps.")
    if device.type == "cuda":
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"torchrun started process {local_rank} on a machine with {gpus} GPU(s); give "
                            f"--nproc_per_node at most {gpus}.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def collapse_warning(kl, active_units):
    """A warning sentence when the posterior has collapsed onto the prior, else None.

    Collapse: no active unit, or a KL under 0.1 nats per image. The decoder then
    models the data without looking at z (Bowman et al. 2016, Sec. 3.1).
    """
    if active_units > 0 and kl >= 0.1:
        return None
    return (f"warning: posterior collapse: the test KL is {kl:.3f} nats and {active_units} latent units "
            f"are active, so q(z|x) is the prior and the decoder ignores z; try --kl_warmup 10, "
            f"--free_bits 0.5 or a smaller --beta.")


def prepare_output_dir(out_dir):
    """Create out_dir if needed and clear a killed run's temporary files; UserError if it is unusable."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir '{out_dir}' ({e.strerror}); choose another folder.") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out_dir '{out_dir}' is not writable; choose another folder.")
    for name in os.listdir(out_dir):  # half-written files of a run that was killed (SIGKILL, power loss)
        if name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


def ckpt_path(out_dir):
    """The checkpoint's path in a run's folder."""
    return os.path.join(out_dir, "checkpoint.pt")


def load_data(config, data_dir):
    """The dataset a run's config names (dataset, image_size, channels, binarize), from
    data_dir, as `load_dataset` returns it, with the test set binarized once if asked."""
    data = load_dataset(config.get("dataset", "mnist"), data_dir, config["image_size"], config["channels"])
    if config.get("binarize"):
        data["test_x"] = binarize_once(data["test_x"])
    return data


def report(model, test_x, test_y, config, out_dir, nll_samples=0, extra=None, classes=None):
    """Final evaluation of a trained model: the test ELBO, the NLL when asked, every
    latent-space figure, the per-class table on stdout; all of it in evaluation.json.

    test_x: (N, C, H, W) uint8 on the model's device; test_y: (N,) labels on the
    CPU, or None; classes: the class names. Returns the dict written to evaluation.json.
    """
    y = test_y.to(test_x.device) if model.num_classes else None
    te = evaluate(model, test_x, config["beta"], config["recon"], labels=y)
    results = dict(extra or {}, test_loss=te["loss"], test_recon=te["recon"], test_kl=te["kl"],
                   active_units=te["active_units"], kl_per_dim=te["kl_per_dim"])
    print(f"test loss {te['loss']:.3f} recon {te['recon']:.3f} kl {te['kl']:.3f} nats/image "
          f"(single-sample ELBO, beta {config['beta']:g}), {te['active_units']} of {model.latent_dim} "
          f"latent units active", flush=True)
    if nll_samples > 0:
        t0 = time.perf_counter()
        nll, bpd = evaluate_nll(model, test_x, nll_samples, labels=y)
        note = "" if config.get("binarize") else (" (continuous pixels under a Bernoulli likelihood: "
                                                  "not comparable with binarized-MNIST results; see --binarize)")
        what = "-log p(x|y)" if model.num_classes else "NLL"
        print(f"test {what} (K={nll_samples}): {nll:.2f} nats/image, {bpd:.4f} bits/dim "
              f"[{time.perf_counter() - t0:.0f} s]{note}", flush=True)
        results.update(nll_samples=nll_samples, test_nll=nll, test_nll_bits_per_dim=bpd)
    rows = write_analysis(model, test_x, test_y, te, out_dir, config["recon"],
                          config.get("interpolate") or (4, 9), config.get("seed", 0), classes)
    if rows:
        print("per class: class  images  recon error  KL  (nats/image, z = mu)")
        for r in rows:
            print(f"           {r['label']:5d}  {r['count']:6d}  {r['recon_error']:11.2f}  {r['kl']:5.2f}  {r['name']}")
    results["per_class"] = rows
    save_json(results, os.path.join(out_dir, "evaluation.json"))
    return results


# The settings a resumed run may change; everything else comes from its checkpoint.
RESUMABLE = ("epochs", "lr", "grad_clip", "data_dir", "device", "amp", "compile", "cuda_graph",
             "nll_samples", "deterministic")


def resume_config(args, explicit):
    """The configuration of a resumed run and its checkpoint: the saved config, with the
    flags in RESUMABLE that the user gave on this command line (`explicit`)."""
    path = ckpt_path(args.out_dir)
    if not os.path.exists(path):
        raise UserError(f"--resume found no checkpoint.pt in '{args.out_dir}'; start the run without --resume, "
                        f"or point --out_dir at the run's folder.")
    _, state = read_checkpoint(path)
    defaults = vars(build_parser().parse_args([]))  # for flags newer than the checkpoint
    config = {**defaults, **state["config"], "resume": True, "overwrite": False, "out_dir": args.out_dir}
    config.update({k: getattr(args, k) for k in RESUMABLE if k in explicit})
    if state["epoch"] >= config["epochs"]:
        raise UserError(f"the run in '{args.out_dir}' has finished epoch {state['epoch']} of {config['epochs']}; "
                        f"give --resume a larger --epochs to train further.")
    return argparse.Namespace(**config), state


def _train(args, state, device, rank, world):
    """The body of `train` in one process: returns (model, history, data, test_x)."""
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is the batch of all {world} processes together, "
                        f"so it must be a multiple of {world}.")
    distributed = dist.is_initialized()  # started by torchrun, even with one process
    use_graph = args.cuda_graph == "on" or (args.cuda_graph == "auto" and device.type == "cuda"
                                            and not args.compile and not distributed)
    if use_graph and device.type != "cuda":
        raise UserError(f"--cuda_graph on needs a CUDA device, and this run uses {device}.")
    if use_graph and distributed:
        raise UserError("--cuda_graph on does not go with torchrun: DistributedDataParallel's gradient "
                        "exchange is not captured in the graph; leave --cuda_graph at auto.")
    # Rank 0 draws what a single process would; DDP gives every process rank 0's weights.
    torch.manual_seed(args.seed + rank)
    data = load_data(vars(args), args.data_dir)
    if data["note"]:
        print(f"data: {data['note']}", flush=True)
    if args.conditional and data["train_y"] is None:
        raise UserError("--conditional needs class labels, and these images have none; use a dataset with "
                        "classes, or a folder with one subfolder per class.")
    if device.type == "cuda":
        need, free = sum(data[k].numel() for k in ("train_x", "test_x")), torch.cuda.mem_get_info(device)[0]
        if need > 0.5 * free:
            raise UserError(f"the images need {need / 1e9:.1f} GB on the GPU, and {free / 1e9:.1f} GB is free "
                            f"(half is kept for training); use a smaller --image_size or --channels 1.")
    train_x, test_x = data["train_x"].to(device), data["test_x"].to(device)
    args.channels, args.image_size = train_x.shape[1], train_x.shape[-1]
    num_classes = len(data["classes"]) if args.conditional else 0
    train_y = data["train_y"].to(device) if num_classes else None
    test_y = data["test_y"].to(device) if num_classes else None
    out_dir = args.out_dir
    if rank == 0:
        prepare_output_dir(out_dir)

    model, step_model, optimizer = setup_training(args.model, args.image_size, args.channels, args.latent_dim,
                                                  args.lr, device, args.compile, args.width, num_classes,
                                                  distributed)
    eval_model = model if distributed else step_model  # each process evaluates its share, without DDP
    history, first_epoch = [], 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = args.lr  # --lr may change on resume
        history, first_epoch = state["history"], state["epoch"] + 1
    graph = (CUDAGraphStep(step_model, optimizer, train_x, args.batch_size, args.recon, args.amp, args.free_bits,
                           args.binarize, args.grad_clip, train_y) if use_graph else None)
    config = dict(vars(args), num_classes=num_classes, classes=data["classes"])
    if rank == 0:
        save_json(config, os.path.join(out_dir, "config.json"))

    n_params = sum(p.numel() for p in model.parameters())
    conditioned = f" (conditional on {num_classes} classes)" if num_classes else ""
    print(f"{args.model} VAE{conditioned}, "
          f"{n_params:,} parameters, latent_dim {args.latent_dim}, {len(train_x):,} train / {len(test_x):,} test "
          f"{args.dataset} images of {args.channels}x{args.image_size}x{args.image_size}"
          f"{' (binarized)' if args.binarize else ''}, device {device}"
          f"{f' x {world} processes' if world > 1 else ''}{', bf16 autocast' if args.amp else ''}"
          f"{', compiled' if args.compile else ''}{', CUDA graph' if use_graph else ''}, writing to {out_dir}",
          flush=True)
    if state is not None:
        print(f"resuming at epoch {first_epoch} of {args.epochs} from {ckpt_path(out_dir)}; the run's other "
              f"settings come from its checkpoint", flush=True)
        # The generators continue where the saved epoch left them, so on a CPU the
        # resumed run is the uninterrupted one, bit for bit.
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if rank > 0:  # the checkpoint holds rank 0's generators; the others need streams of their own
            torch.manual_seed(args.seed + rank + world * first_epoch)

    fixed = to_float(test_x[:16])  # the same test images in every reconstruction figure
    fixed_y = None if test_y is None else test_y[:16]
    share_x, share_y = test_x[rank::world], None if test_y is None else test_y[rank::world]
    recon_epochs = {1, 5, 15, args.epochs}
    resume_hint = f"continue with: python vae.py --resume --out_dir {out_dir}"
    with SignalFlag() as stop:
        for epoch in range(first_epoch, args.epochs + 1):
            beta = beta_schedule(epoch, args.beta, args.kl_warmup)
            t0 = time.perf_counter()
            try:
                tr = train_epoch(step_model, optimizer, train_x, args.batch_size, beta, args.recon, args.amp,
                                 args.free_bits, args.binarize, args.grad_clip, graph, stop,
                                 desc=f"epoch {epoch}/{args.epochs}", labels=train_y)
            except StopTraining as e:
                saved = (f"the checkpoint of epoch {epoch - 1} in '{ckpt_path(out_dir)}' is untouched"
                         if epoch > 1 else "no epoch had finished, so no checkpoint was written")
                if e.signum:
                    raise UserError(f"stopped by {signal.Signals(e.signum).name} during epoch {epoch} "
                                    f"(step {e.step}); {saved}; {resume_hint}", 128 + e.signum) from None
                raise UserError(f"the {e.term} became non-finite at epoch {epoch}, step {e.step} (loss, recon, "
                                f"kl, gradient norm = {', '.join(f'{v:.4g}' for v in e.values)}), so training "
                                f"stopped; {saved}; try a lower --lr (now {args.lr:g}) or --grad_clip 10, "
                                f"and --resume.", 3) from None
            train_seconds = time.perf_counter() - t0  # .tolist() in train_epoch waited for the device
            if world > 1:
                # Each process updated BatchNorm's running statistics on its own share in
                # the last step; evaluate and save with rank 0's, as DDP does at every step.
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            te = evaluate(eval_model, share_x, beta, args.recon, amp=args.amp, labels=share_y,
                          all_reduce=world > 1)
            seconds = time.perf_counter() - t0
            row = dict(epoch=epoch, beta=beta, **{f"train_{k}": v for k, v in tr.items()},
                       **{f"test_{k}": v for k, v in te.items() if k != "kl_per_dim"},
                       seconds=seconds, images_per_sec=len(train_x) / train_seconds)
            history.append(row)
            print(f"epoch {epoch:3d}/{args.epochs} | beta {beta:.3f} | train loss {tr['loss']:8.3f} recon "
                  f"{tr['recon']:8.3f} kl {tr['kl']:7.3f} | test loss {te['loss']:8.3f} recon "
                  f"{te['recon']:8.3f} kl {te['kl']:7.3f} | mu {te['mu_mean']:+.3f} logvar "
                  f"{te['logvar_mean']:+.3f} AU {te['active_units']:3d} | {seconds:6.2f} s "
                  f"{row['images_per_sec']:7.0f} img/s", flush=True)
            warning = collapse_warning(te["kl"], te["active_units"])
            if warning:
                print(warning, flush=True)

            if rank == 0:
                if epoch in recon_epochs:
                    save_reconstructions(model, fixed, os.path.join(out_dir, f"reconstructions_epoch{epoch:03d}.png"),
                                         fixed_y)
                save_csv(history, os.path.join(out_dir, "metrics.csv"))
                save_checkpoint(ckpt_path(out_dir), model, optimizer, epoch, config, history)
            if stop.signum:  # arrived during the evaluation or the saving: the epoch is complete
                raise UserError(f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch}, "
                                f"which is saved in '{ckpt_path(out_dir)}'; {resume_hint}", 128 + stop.signum)
    return model, history, data, test_x


def train(args, explicit=()):
    """Train, evaluate every epoch and write every output to args.out_dir.

    args: the namespace of `parse_args`; explicit: the flags given on the command
    line (a resumed run takes only those, from RESUMABLE, over its saved config).
    Under torchrun, each process runs this; see `train_epoch` for how they share
    the work. Only rank 0 prints and writes files, and its checkpoint is the same
    as a single process's.

    Returns (model, history): the trained VAE in eval mode and one dict of metrics
    per epoch (the rows of metrics.csv).

    Raises:
        UserError: bad input (missing data, unwritable folder, another run in the
            folder); a non-finite value (exit code 3); SIGINT or SIGTERM (130, 143).
    """
    state = None
    if args.resume:
        args, state = resume_config(args, explicit)
    elif os.path.exists(ckpt_path(args.out_dir)) and not args.overwrite:
        raise UserError(f"'{args.out_dir}' already holds a run (checkpoint.pt); continue it with --resume, "
                        f"replace it with --overwrite, or choose another --out_dir.")
    device = select_device(args.device, args.deterministic)
    rank, world, device = init_distributed(device)
    try:
        # The other processes' prints would repeat rank 0's, line for line.
        with contextlib.redirect_stdout(sys.stdout if rank == 0 else io.StringIO()):
            model, history, data, test_x = _train(args, state, device, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:  # the final evaluation on the whole test set, by one process
        plot_losses(history, os.path.join(args.out_dir, "loss_curves.png"))
        report(model, test_x, data["test_y"], vars(args), args.out_dir, args.nll_samples,
               extra=dict(epoch=history[-1]["epoch"]), classes=data["classes"])
    return model.eval(), history


def evaluate_checkpoint(args):
    """`--checkpoint PATH --epochs 0`: evaluate a saved model and write every figure.

    The model's configuration comes from the checkpoint; the data from --data_dir
    (default: the folder the run was trained from).
    Nothing is trained and the checkpoint is never written. Returns the results dict.
    """
    device = select_device(args.device, args.deterministic)
    torch.manual_seed(args.seed)
    model, state = read_checkpoint(args.checkpoint, device)
    model.eval()
    config, epoch = state["config"], state["epoch"]
    if args.nll_samples > 0 and config["recon"] != "bce":
        raise UserError("--nll_samples needs a model trained with --recon bce, the Bernoulli likelihood; "
                        f"this checkpoint used --recon {config['recon']}.")
    out_dir = args.out_dir.replace("{model}", config["model"])
    data = load_data(config, args.data_dir or config["data_dir"])
    prepare_output_dir(out_dir)
    print(f"{config['model']} VAE from {args.checkpoint} (epoch {epoch}), device {device}, "
          f"writing to {out_dir}", flush=True)
    return report(model, data["test_x"].to(device), data["test_y"], config, out_dir, args.nll_samples,
                  extra=dict(checkpoint=args.checkpoint, epoch=epoch), classes=data["classes"])


# ----------------------------------------------------------------------------
# Command line
#
# Each default lives here, once; --help prints it. The checks below turn a bad
# value into one sentence from argparse (exit code 2) before anything runs.

IMAGE_SIZES = (28, 32, 64, 128)


def _number(kind, test, allowed):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got '{text}'") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
image_size = _number(int, lambda v: v in IMAGE_SIZES,
                     f"one of {', '.join(map(str, IMAGE_SIZES))} (the conv model halves the side "
                     "down to 7 or 4 pixels)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' to each flag's help, except where the default is None: there
    the help says what the default depends on."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    """The command line: every flag, its default and its help, in one place."""
    p = argparse.ArgumentParser(
        prog="vae.py", description="Train a variational autoencoder on MNIST (or another dataset, or your "
                                   "own folder of images) and write its figures. Under torchrun, trains on "
                                   "several processes with DistributedDataParallel.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="mnist",
                   help="a torchvision dataset, downloaded to --data_dir if missing, or 'folder': your own "
                        "images in --data_dir (class subfolders or flat; train/ and val/ or test/ subfolders "
                        "are the splits, else a fixed 10%% is the test split)")
    g.add_argument("--data_dir", default=None,
                   help="folder holding the dataset in torchvision's layout (e.g. MNIST/raw/), or the "
                        "image folder; default ./mnist for mnist, ./data for the other torchvision "
                        "datasets (a folder must be named); with --checkpoint, the run's own")
    g.add_argument("--image_size", type=image_size, default=None,
                   help=f"side in pixels, one of {IMAGE_SIZES}; default: the dataset's own (28 for the "
                        f"MNIST family, 32 for cifar10) and 64 for a folder. Images are resized (a folder's "
                        f"centre-cropped) once at load time")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 = grayscale, 3 = RGB, converted once at load time; default: the dataset's own, "
                        "and 3 for a folder")
    g.add_argument("--binarize", action="store_true",
                   help="the likelihood protocol of Burda et al. 2015: training pixels drawn as "
                        "Bernoulli(intensity) afresh each step, the test set binarized once with a fixed seed")

    g = p.add_argument_group("model and objective")
    g.add_argument("--model", choices=sorted(MODELS), default="conv", help="ConvVAE or MLPVAE")
    g.add_argument("--latent_dim", type=positive_int, default=32,
                   help="size of z; MNIST uses about 10-20 dimensions, and the unused rest collapse "
                        "harmlessly to the prior, so 32 leaves headroom without slowing anything")
    g.add_argument("--width", type=positive_int, default=32,
                   help="model size: channels of the conv model's first block (doubled per block, "
                        "up to 256), or 16x / 8x this many hidden units in the MLP")
    g.add_argument("--recon", choices=("bce", "mse"), default="bce",
                   help="likelihood p(x|z): bce = Bernoulli, mse = Gaussian with unit variance "
                        "(0.5 * squared error, up to a constant)")
    g.add_argument("--beta", type=nonnegative_float, default=1.0,
                   help="KL weight: 1 is the plain ELBO, >1 a beta-VAE (Higgins et al. 2017), "
                        "<1 sharper reconstructions and a less regular latent space")
    g.add_argument("--kl_warmup", type=nonnegative_int, default=0,
                   help="epochs over which beta rises linearly from 0 to --beta (Bowman et al. 2016); "
                        "against posterior collapse")
    g.add_argument("--free_bits", type=nonnegative_float, default=0.0,
                   help="nats: each latent dimension's batch-mean KL counts as at least this much in "
                        "the loss (Kingma et al. 2016); against posterior collapse")
    g.add_argument("--conditional", action="store_true",
                   help="a conditional VAE (Sohn et al. 2015): encoder and decoder also see the one-hot "
                        "class label, and samples_per_class.png shows one row of samples per class")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=nonnegative_int, default=30,
                   help="passes over the training images; 0 only with --checkpoint")
    g.add_argument("--batch_size", type=positive_int, default=128,
                   help="images per optimizer step; under torchrun, of all processes together")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--seed", type=int, default=0, help="random seed for initialisation, batches and z")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto takes cuda, then mps, then cpu")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast for the model (the loss stays fp32). Off by default: at MNIST "
                        "size a GPU step is bound by kernel launches, and bf16 measured slower than "
                        "TF32 on an H100; on a CPU without native bf16 it is emulated and 10x slower. "
                        "Worth trying for larger images or models")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (a one-off cost of 10-30 s); at MNIST size it "
                        "measured no faster than eager on an H100, where --cuda_graph is what helps")
    g.add_argument("--grad_clip", type=nonnegative_float, default=0.0,
                   help="clip the gradient to this global L2 norm; 0 = off, because Adam already scales "
                        "each step and a healthy MNIST run never needs it; try 10 after a non-finite stop")
    g.add_argument("--deterministic", action="store_true",
                   help="PyTorch's deterministic algorithms, for identical CUDA runs (slower); CPU runs "
                        "with the same --seed are identical without it")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir from its checkpoint (weights, optimizer, epoch, "
                        "random state, metrics); only --epochs, --lr, --grad_clip, --data_dir, "
                        "--nll_samples and the device and speed flags may change")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out_dir that already holds one, replacing it")
    g.add_argument("--cuda_graph", choices=("auto", "on", "off"), default="auto",
                   help="replay each training step as one CUDA graph: auto = on for CUDA without "
                        "--compile, where it makes an MNIST epoch several times faster")

    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--nll_samples", type=nonnegative_int, default=0,
                   help="K importance samples for the test NLL at the end (Burda et al. 2015); 0 = off. "
                        "K=1000 takes seconds on a GPU and minutes on a CPU; --recon bce only")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="with --epochs 0: evaluate this saved model and write every figure, no training")
    g.add_argument("--out_dir", default="outputs/{model}",
                   help="folder for figures, metrics.csv, config.json, evaluation.json and "
                        "checkpoint.pt; {model} is replaced by the model's name")
    g.add_argument("--interpolate", type=int, nargs=2, default=[4, 9], metavar=("A", "B"),
                   help="interpolate between the first test images of classes A and B (for MNIST, "
                        "digits); when one is missing, between the first two classes")
    return p


def given_flags(parser, argv):
    """The destinations of the flags written out in argv, e.g. {'lr', 'epochs'}."""
    words = {w.split("=")[0] for w in argv if w.startswith("--")}
    return {a.dest for a in parser._actions if words & set(a.option_strings)}


def parse_args(argv=None):
    """Parse and cross-check the command line; a bad combination exits with code 2 and one sentence."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (args.overwrite or args.checkpoint):
        parser.error("--resume continues the run in --out_dir: it goes with neither --overwrite nor --checkpoint")
    if args.checkpoint is None and args.epochs == 0:
        parser.error("--epochs 0 trains nothing: it only goes with --checkpoint PATH, to evaluate a saved model")
    if args.checkpoint is not None and args.epochs != 0:
        parser.error("--checkpoint evaluates a saved model without training it: add --epochs 0")
    if args.nll_samples > 0 and args.recon != "bce" and args.checkpoint is None:
        parser.error("--nll_samples needs --recon bce: the NLL is defined for the Bernoulli likelihood only")
    if args.checkpoint is None:
        args.out_dir = args.out_dir.replace("{model}", args.model)
        if args.data_dir is None and args.dataset == "folder" and not args.resume:
            parser.error("--dataset folder needs --data_dir, the folder of images")
        if args.data_dir is None and not args.resume:
            args.data_dir = "./mnist" if args.dataset == "mnist" else "./data"
    return args


def main(argv=None):
    """Run the command line with `argv` (default: sys.argv[1:]).

    Returns the metrics history (one dict per epoch), or with --checkpoint the
    evaluation results. A bad argument or input prints one sentence to stderr
    and raises SystemExit with a non-zero code (2 for input errors).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return evaluate_checkpoint(args) if args.checkpoint else train(args, given_flags(build_parser(), argv))[1]
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the other processes would say it again
            print(f"vae.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("vae.py: interrupted; the last saved checkpoint is intact.", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # e.g. a full disk while writing a figure
        print(f"vae.py: error: {e.strerror or e} ({e.filename or 'no file name'}).", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
