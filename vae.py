"""
A Variational Autoencoder in one file: data, models, loss, training, evaluation
and figures, in the order you would read them.

    python vae.py --data_dir ./mnist --epochs 30 --beta 0.5     # train on MNIST
    python vae.py --help                                         # every flag
    from vae import ConvVAE, vae_loss                            # in your project

A VAE (Kingma & Welling 2013) learns an encoder q(z|x) = N(mu(x), diag(exp(logvar(x))))
and a decoder p(x|z) by maximising the evidence lower bound (ELBO) on log p(x):

    log p(x) >= ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),   p(z) = N(0, I)

We minimise loss = recon + beta * kl, with recon = -E_q[log p(x|z)] estimated from one
sample of z, and kl in closed form. beta = 1 is the plain ELBO; beta != 1 is the
beta-VAE of Higgins et al. (2017). Every number is in nats per image.

Measured results are in README.md (command, machine, seconds per epoch, test loss).

References
    Kingma & Welling, "Auto-Encoding Variational Bayes", 2013, arXiv:1312.6114
    Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained
        Variational Framework", ICLR 2017
"""

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets
from torchvision.utils import make_grid, save_image
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input or environment, reported as one sentence.

    `main` prints the message without a traceback and exits with `exit_code`.
    """

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------
# Data
#
# MNIST is small (60,000 + 10,000 images of 28x28 bytes, 55 MB), so each split is
# held once as a uint8 tensor on the training device and batched by indexing it
# with a shuffled index. That removes the per-image Python work of a DataLoader,
# which dominates a VAE's epoch time on a GPU. Bytes become floats in [0, 1] one
# batch at a time, which keeps the resident copy 4x smaller than float32.

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(data_dir, image_size=28):
    """Read MNIST with torchvision, downloading it only when the files are missing.

    Args:
        data_dir: folder that holds (or will hold) `MNIST/raw/<the four IDX files>`,
            the layout of `torchvision.datasets.MNIST`.
        image_size: side in pixels; other than 28 resizes every image once, here
            (bilinear with antialiasing), never in the training loop.

    Returns:
        dict with `train_x` (60000, 1, S, S) uint8, `train_y` (60000,) int64,
        `test_x` (10000, 1, S, S) uint8, `test_y` (10000,) int64, all on the CPU.

    Raises:
        UserError: the files are missing and cannot be downloaded, or cannot be read.
    """
    raw = os.path.join(data_dir, "MNIST", "raw")
    if not all(os.path.isfile(os.path.join(raw, f)) for f in MNIST_FILES):
        _download_mnist(data_dir, raw)
    splits = {}
    for name, train in (("train", True), ("test", False)):
        try:
            ds = datasets.MNIST(data_dir, train=train, download=False)
        except Exception as e:  # a truncated or corrupt file fails inside torchvision
            raise UserError(f"cannot read the MNIST files in '{raw}' ({type(e).__name__}: {e}); "
                            f"replace them with the original files.") from None
        x = ds.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        if image_size != x.shape[-1]:
            x = resize_images(x, image_size)
        splits[f"{name}_x"], splits[f"{name}_y"] = x.contiguous(), ds.targets.long()
    return splits


def _download_mnist(data_dir, raw):
    # torchvision prints every mirror it tries; keep the user's terminal to one sentence.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            for train in (True, False):
                datasets.MNIST(data_dir, train=train, download=True)
            return
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = lines[-1] if lines else type(e).__name__
    raise UserError(f"MNIST is not in '{raw}' and could not be downloaded ({reason}); "
                    f"put the four files {', '.join(MNIST_FILES)} (uncompressed) in that "
                    f"folder, or point --data_dir at a folder whose MNIST/raw/ has them.")


def resize_images(x, image_size):
    """Resize uint8 images (N, C, H, W) to (N, C, image_size, image_size), still uint8."""
    y = F.interpolate(x.float() / 255, size=(image_size, image_size), mode="bilinear",
                      antialias=True, align_corners=False)
    return (y * 255).round_().clamp_(0, 255).to(torch.uint8)


def to_float(x_uint8):
    """uint8 images in [0, 255] -> float32 in [0, 1], same shape."""
    return x_uint8.float().div_(255)


# ----------------------------------------------------------------------------
# Models
#
# Both models share one interface, the one of pytorch/examples' vae:
#   encode(x) -> (mu, logvar)        x: (B, C, H, W) in [0, 1]; mu, logvar: (B, latent_dim)
#   reparameterize(mu, logvar) -> z  z: (B, latent_dim)
#   decode(z) -> x_hat               x_hat: (B, C, H, W) in [0, 1]
#   forward(x) -> (x_hat, mu, logvar)
#   sample(n) -> (n, C, H, W) images decoded from z ~ N(0, I)
# The decoder's last layer outputs logits; the loss uses them directly, because
# binary cross-entropy computed from a sigmoid that has rounded to 0 or 1 is
# clipped and its gradient lost. `decode` applies the sigmoid for the user.


class VAE(nn.Module):
    """Shared VAE logic; a subclass builds `encoder`, `fc_mu`, `fc_logvar`, `decoder`.

    `encoder` maps (B, C, H, W) to features (B, F); `fc_mu` and `fc_logvar` map
    those to (B, latent_dim); `decoder` maps z (B, latent_dim) to logits (B, C, H, W).
    """

    def __init__(self, image_size, channels, latent_dim):
        super().__init__()
        if channels < 1 or latent_dim < 1:
            raise ValueError(f"channels and latent_dim must be positive, got {channels} and {latent_dim}")
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim

    def encode(self, x):
        """x: (B, C, H, W) in [0, 1] -> mu, logvar: (B, latent_dim), real-valued."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

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

    def decode_logits(self, z):
        """z: (B, latent_dim) -> logits (B, C, H, W) of p(x|z); sigmoid gives pixel means."""
        return self.decoder(z)

    def decode(self, z):
        """z: (B, latent_dim) -> x_hat: (B, C, H, W) in [0, 1], the mean of p(x|z)."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x, return_logits=False):
        """x: (B, C, H, W) in [0, 1] -> (x_hat, mu, logvar).

        x_hat is (B, C, H, W) in [0, 1], decoded from one sample z ~ q(z|x); with
        `return_logits=True` it is the decoder's logits instead, which is what
        `vae_loss` takes.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        logits = self.decode_logits(z)
        return (logits if return_logits else torch.sigmoid(logits)), mu, logvar

    @torch.no_grad()
    def sample(self, n, generator=None):
        """Decode n draws from the prior z ~ N(0, I): (n, C, H, W) in [0, 1], no gradient."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z)


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

    Raises:
        ValueError: image_size is not a multiple of 4 or is under 16.
    """

    def __init__(self, image_size=28, channels=1, latent_dim=32, base_channels=32):
        super().__init__(image_size, channels, latent_dim)
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
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_logvar = nn.Linear(features, latent_dim)

        dec = [nn.Linear(latent_dim, features), nn.LeakyReLU(0.2),
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
    """

    def __init__(self, image_size=28, channels=1, latent_dim=32, hidden=(512, 256)):
        super().__init__(image_size, channels, latent_dim)
        d = channels * image_size * image_size
        enc, n_in = [nn.Flatten()], d  # (B, C, H, W) -> (B, D)
        for h in hidden:
            enc += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(n_in, latent_dim)
        self.fc_logvar = nn.Linear(n_in, latent_dim)
        dec, n_in = [], latent_dim
        for h in reversed(hidden):
            dec += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        dec += [nn.Linear(n_in, d), nn.Unflatten(1, (channels, image_size, image_size))]  # logits
        self.decoder = nn.Sequential(*dec)


MODELS = {"conv": ConvVAE, "mlp": MLPVAE}


def build_model(model, image_size, channels, latent_dim):
    """Build a ConvVAE ('conv') or MLPVAE ('mlp'); raises ValueError for an unknown name."""
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}', expected one of {sorted(MODELS)}")
    return MODELS[model](image_size=image_size, channels=channels, latent_dim=latent_dim)


# ----------------------------------------------------------------------------
# Loss
#
# Reduction, said once: each term is summed over pixels (recon) or latent
# dimensions (kl), giving nats per image, then averaged over the batch. Averaging
# the reconstruction per pixel instead would shrink it 784-fold against the KL,
# which is how VAEs end up with an unexplained tiny KL weight.


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, in nats per image.

    Kingma & Welling (2013), Appendix B, for a diagonal Gaussian q and p(z) = N(0, I):
        -KL = 0.5 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
    hence the minus sign in front: the KL itself is >= 0, and 0 exactly when
    mu = 0 and logvar = 0.

    mu, logvar: (B, latent_dim) -> (B,).
    """
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def reconstruction_loss(recon_logits, x, recon="bce"):
    """-log p(x|z) for one z, in nats per image: (B, C, H, W) logits and x -> (B,).

    recon='bce': Bernoulli likelihood with mean sigmoid(logits), for x in [0, 1]
        (Kingma & Welling 2013, Appendix C.1), from the logits for stability.
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


def vae_loss(recon_logits, x, mu, logvar, beta=1.0, recon="bce"):
    """The negative (beta-)ELBO and its parts, each averaged over the batch.

        loss = recon + beta * kl        (Kingma & Welling 2013, eq. 10; Higgins et al. 2017, eq. 4)

    Args:
        recon_logits: (B, C, H, W) decoder logits, `model(x, return_logits=True)[0]`;
            not the [0, 1] images that `model(x)` returns.
        x: (B, C, H, W) targets in [0, 1].
        mu, logvar: (B, latent_dim) from `model.encode`.
        beta: weight of the KL term, >= 0; 1 gives the plain negative ELBO.
        recon: 'bce' or 'mse', see `reconstruction_loss`.

    Returns:
        (loss, recon, kl): scalar tensors in nats per image; loss == recon + beta * kl.
    """
    rec = reconstruction_loss(recon_logits, x, recon).mean()
    kl = kl_divergence(mu.float(), logvar.float()).mean()
    return rec + beta * kl, rec, kl


# ----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, images, beta=1.0, recon="bce", batch_size=1000, amp=False):
    """Average loss, recon and KL over a split, in eval mode, with z sampled.

    The test loss is the true single-sample estimate of the negative ELBO (z drawn
    from q(z|x), not z = mu), so it is comparable with the training loss.

    Args:
        images: (N, C, H, W) uint8 on the model's device.
        amp: run the model under bf16 autocast (the loss is summed in fp32).

    Returns:
        dict of floats: loss, recon, kl (nats per image), mu_mean, logvar_mean (the
        means of mu and logvar over images and latent dimensions).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, device=images.device)  # summed on the device, read once
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size])
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            logits, mu, logvar = model(x, return_logits=True)
        loss, rec, kl = vae_loss(logits, x, mu, logvar, beta, recon)
        sums += torch.stack([loss, rec, kl, mu.float().mean(), logvar.float().mean()]) * len(x)
    model.train(was_training)
    loss, rec, kl, mu_mean, logvar_mean = (sums / len(images)).tolist()
    return dict(loss=loss, recon=rec, kl=kl, mu_mean=mu_mean, logvar_mean=logvar_mean)


# ----------------------------------------------------------------------------
# Figures
#
# Image grids come from torchvision; the loss curves from matplotlib's object API
# (no pyplot), so that importing or running this never changes a caller's
# matplotlib backend.


@torch.no_grad()
def save_reconstructions(model, x, path):
    """Save originals (top row) above their reconstructions (bottom row).

    x: (n, C, H, W) in [0, 1]. The reconstruction decodes the posterior mean mu,
    the model's best single guess, rather than a random z.
    """
    was_training = model.training
    model.eval()
    x_hat = model.decode(model.encode(x)[0])
    model.train(was_training)
    save_image(torch.cat([x, x_hat]), path, nrow=len(x), padding=2, pad_value=0.5)


@torch.no_grad()
def save_samples(model, path, n=64, seed=0):
    """Save an sqrt(n) x sqrt(n) grid of images decoded from z ~ N(0, I) (fixed seed)."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    images = model.sample(n, generator=g)
    model.train(was_training)
    save_image(images, path, nrow=int(math.sqrt(n)), padding=2, pad_value=0.5)


@torch.no_grad()
def save_interpolation(model, x_a, x_b, path, steps=12):
    """Decode the line from mu(x_a) to mu(x_b) in `steps` points, between x_a and x_b.

    x_a, x_b: (C, H, W) in [0, 1]. The saved row is x_a, the decoded points, x_b.
    """
    was_training = model.training
    model.eval()
    mu = model.encode(torch.stack([x_a, x_b]))[0]  # (2, latent_dim)
    t = torch.linspace(0, 1, steps, device=mu.device).unsqueeze(1)  # (steps, 1)
    z = (1 - t) * mu[0] + t * mu[1]  # (steps, latent_dim)
    images = torch.cat([x_a[None], model.decode(z), x_b[None]])
    model.train(was_training)
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


# ----------------------------------------------------------------------------
# Saving and loading
#
# Every file is written to a temporary file in the same folder and moved into
# place, so a crash mid-write leaves the previous complete file, never half of one.


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_json(obj, path):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def save_csv(rows, path):
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    _atomic_write(path, write)


def save_checkpoint(path, model, optimizer, epoch, config, history):
    """Save a plain dict: model and optimizer state, epoch, config and metrics (plain types)."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                 config=config, history=history)
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu"):
    """Rebuild the model saved by a training run, in eval mode.

    Loads with `torch.load(..., weights_only=True)`, which refuses pickles that
    carry arbitrary Python objects.

    Returns:
        (model, config): the VAE on `device`, and the run's configuration dict.

    Raises:
        FileNotFoundError: no file at path.
        pickle.UnpicklingError / RuntimeError: the file is not a checkpoint of this script.
        KeyError: the dict lacks 'model' or 'config'.
    """
    state = torch.load(path, map_location=device, weights_only=True)
    config = state["config"]
    model = build_model(config["model"], config["image_size"], config["channels"], config["latent_dim"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


# ----------------------------------------------------------------------------
# Training


def select_device(name):
    """'auto' -> cuda, then mps, then cpu; a named device must be available (UserError)."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif not available[name]:
        raise UserError(f"--device {name} was asked for but is not available here; "
                        f"use --device auto or cpu.")
    if name == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (10-bit mantissa)
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def train_step(model, optimizer, x, beta, recon, amp=False):
    """One Adam step on a batch x (B, C, H, W) in [0, 1].

    Returns the detached tensor [loss, recon, kl] (nats per image, batch means),
    left on the device so that the caller decides when to wait for it.
    """
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        logits, mu, logvar = model(x, return_logits=True)
    loss, rec, kl = vae_loss(logits, x, mu, logvar, beta, recon)  # in fp32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, rec, kl]).detach()


class CUDAGraphStep:
    """`train_step` on a full batch of `images[idx]`, captured once as a CUDA graph.

    A VAE for MNIST is so small that on a GPU an eager step is bound by the CPU
    launching its ~100 kernels one at a time, not by the arithmetic. A CUDA graph
    records the kernels of one whole step (batch gather, forward, backward, Adam)
    once, and each call replays them with a single launch ("whole network capture"
    in PyTorch's CUDA Graphs notes). Only the batch's indices change between
    replays: they are copied into a buffer that the graph reads.

    Capture needs a few warm-up steps; they would train the model, so its state
    and the optimizer's are put back afterwards. Adam must be `capturable`.

    Args:
        model, optimizer, beta, recon, amp: as for `train_step`.
        images: (N, C, H, W) uint8 on the GPU.
        batch_size: B; a call takes exactly B indices.
    """

    def __init__(self, model, optimizer, images, batch_size, beta, recon, amp):
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=images.device)

        def step():
            return train_step(model, optimizer, to_float(images[self.idx]), beta, recon, amp)

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
            self.out = step()  # (3,) loss, recon, kl: rewritten by every replay
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(before[k])
            for p in params:
                for k, v in optimizer.state[p].items():
                    v.copy_(opt_before[p][k]) if p in opt_before else v.zero_()  # zero = a fresh Adam

    def __call__(self, idx):
        """idx: (B,) int64 on the GPU -> (3,) [loss, recon, kl], valid until the next call."""
        self.idx.copy_(idx)
        self.graph.replay()
        return self.out


def train_epoch(model, optimizer, images, batch_size, beta, recon, amp=False, graph=None, desc=""):
    """One pass over `images` (N, C, H, W) uint8 in a random order.

    amp runs the forward pass under bf16 autocast; `graph`, a CUDAGraphStep for
    this model, replaces the eager step for every full batch. Returns the mean
    loss, recon and KL over the epoch (nats per image). They are summed on the
    device and read once at the end, so the loop never waits for the GPU.
    """
    model.train()
    n = len(images)
    perm = torch.randperm(n, device=images.device)
    sums = torch.zeros(3, device=images.device)
    bar = tqdm(range(0, n, batch_size), desc=desc, leave=False, unit="batch",
               disable=not sys.stderr.isatty())
    for start in bar:
        idx = perm[start:start + batch_size]
        if graph is not None and len(idx) == batch_size:
            sums += graph(idx) * batch_size
        else:  # eager, also for the last, smaller batch
            x = to_float(images[idx])  # (B, C, H, W) in [0, 1]
            sums += train_step(model, optimizer, x, beta, recon, amp) * len(idx)
    loss, rec, kl = (sums / n).tolist()
    return dict(loss=loss, recon=rec, kl=kl)


def setup_training(model_name, image_size, channels, latent_dim, lr, device, compile=False):
    """Build the model on `device` with its fast settings, and its Adam optimizer.

    Returns (model, step_model, optimizer): `step_model` is `torch.compile(model)`
    when compile is true, else `model` itself. They share parameters; save and plot
    with `model`, so that the checkpoint loads without torch.compile.
    """
    model = build_model(model_name, image_size, channels, latent_dim).to(device)
    if model_name == "conv":
        # NHWC weights run the convolutions about 25% faster on CPU (oneDNN) and on
        # tensor-core GPUs; the state dict and the results are the same.
        model = model.to(memory_format=torch.channels_last)
    # Fused Adam updates every parameter in one kernel instead of a dozen per tensor;
    # capturable keeps its step count on the GPU, so a CUDA graph can record it.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cuda", "cpu"),
                                 capturable=device.type == "cuda")
    step_model = torch.compile(model) if compile else model
    return model, step_model, optimizer


def train(args):
    """Train, evaluate every epoch and write every output to args.out_dir.

    args: the namespace of `parse_args`. Returns (model, history): the trained
    VAE in eval mode and one dict of metrics per epoch (the rows of metrics.csv).
    Raises UserError for bad input (missing data, unwritable folder).
    """
    device = select_device(args.device)
    amp = args.amp
    use_graph = args.cuda_graph == "on" or (args.cuda_graph == "auto" and device.type == "cuda"
                                            and not args.compile)
    if use_graph and device.type != "cuda":
        raise UserError(f"--cuda_graph on needs a CUDA device, and this run uses {device}.")
    torch.manual_seed(args.seed)
    data = load_mnist(args.data_dir, args.image_size)
    out_dir = args.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir '{out_dir}' ({e.strerror}); choose another folder.") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out_dir '{out_dir}' is not writable; choose another folder.")
    train_x, test_x = data["train_x"].to(device), data["test_x"].to(device)
    test_y = data["test_y"]
    channels = train_x.shape[1]

    model, step_model, optimizer = setup_training(args.model, args.image_size, channels, args.latent_dim,
                                                  args.lr, device, args.compile)
    graph = (CUDAGraphStep(step_model, optimizer, train_x, args.batch_size, args.beta, args.recon, amp)
             if use_graph else None)
    config = dict(vars(args), channels=channels)
    save_json(config, os.path.join(out_dir, "config.json"))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} VAE, {n_params:,} parameters, latent_dim {args.latent_dim}, "
          f"{len(train_x):,} train / {len(test_x):,} test images of {channels}x{args.image_size}x"
          f"{args.image_size}, device {device}{', bf16 autocast' if amp else ''}"
          f"{', compiled' if args.compile else ''}{', CUDA graph' if use_graph else ''}, "
          f"writing to {out_dir}", flush=True)

    fixed = to_float(test_x[:16])  # the same test images in every reconstruction figure
    recon_epochs = {1, 5, 15, args.epochs}
    history = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        tr = train_epoch(step_model, optimizer, train_x, args.batch_size, args.beta, args.recon, amp, graph,
                         desc=f"epoch {epoch}/{args.epochs}")
        train_seconds = time.perf_counter() - t0  # .tolist() in train_epoch waited for the device
        te = evaluate(step_model, test_x, args.beta, args.recon, amp=amp)
        seconds = time.perf_counter() - t0
        row = dict(epoch=epoch, beta=args.beta,
                   **{f"train_{k}": v for k, v in tr.items()}, **{f"test_{k}": v for k, v in te.items()},
                   seconds=seconds, images_per_sec=len(train_x) / train_seconds)
        history.append(row)
        print(f"epoch {epoch:3d}/{args.epochs} | train loss {tr['loss']:8.3f} recon {tr['recon']:8.3f} "
              f"kl {tr['kl']:7.3f} | test loss {te['loss']:8.3f} recon {te['recon']:8.3f} "
              f"kl {te['kl']:7.3f} | mu {te['mu_mean']:+.3f} logvar {te['logvar_mean']:+.3f} | "
              f"{seconds:6.2f} s {row['images_per_sec']:7.0f} img/s", flush=True)

        if epoch in recon_epochs:
            save_reconstructions(model, fixed, os.path.join(out_dir, f"reconstructions_epoch{epoch:03d}.png"))
        save_csv(history, os.path.join(out_dir, "metrics.csv"))
        save_checkpoint(os.path.join(out_dir, "checkpoint.pt"), model, optimizer, epoch, config, history)

    save_samples(model, os.path.join(out_dir, "samples.png"), seed=args.seed)
    a, b = args.interpolate
    has = [torch.nonzero(test_y == c) for c in (a, b)]
    if all(len(h) for h in has):
        save_interpolation(model, to_float(test_x[has[0][0, 0]]), to_float(test_x[has[1][0, 0]]),
                           os.path.join(out_dir, "interpolation.png"))
    else:
        print(f"note: no test image of class {a} or {b}; interpolation.png not written")
    plot_losses(history, os.path.join(out_dir, "loss_curves.png"))
    return model.eval(), history


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
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
image_size = _number(int, lambda v: v in IMAGE_SIZES,
                     f"one of {', '.join(map(str, IMAGE_SIZES))} (the conv model halves the side "
                     "down to 7 or 4 pixels)")


def build_parser():
    p = argparse.ArgumentParser(
        prog="vae.py", description="Train a variational autoencoder on MNIST and write its figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="./mnist",
                   help="folder holding MNIST/raw/ (torchvision's layout); downloaded there if missing")
    p.add_argument("--epochs", type=positive_int, default=30, help="passes over the 60,000 training images")
    p.add_argument("--batch_size", type=positive_int, default=128, help="images per optimizer step")
    p.add_argument("--image_size", type=image_size, default=28,
                   help=f"side in pixels, one of {IMAGE_SIZES}; not 28 resizes MNIST once at load time")
    p.add_argument("--latent_dim", type=positive_int, default=32,
                   help="size of z; MNIST uses about 10-20 dimensions, and the unused rest collapse "
                        "harmlessly to the prior, so 32 leaves headroom without slowing anything")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--beta", type=nonnegative_float, default=1.0,
                   help="KL weight: 1 is the plain ELBO, >1 a beta-VAE (Higgins et al. 2017), "
                        "<1 sharper reconstructions and a less regular latent space")
    p.add_argument("--model", choices=sorted(MODELS), default="conv", help="ConvVAE or MLPVAE")
    p.add_argument("--recon", choices=("bce", "mse"), default="bce",
                   help="likelihood p(x|z): bce = Bernoulli, mse = Gaussian with unit variance "
                        "(0.5 * squared error, up to a constant)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for the model (the loss stays fp32). Off by default: at MNIST "
                        "size a GPU step is bound by kernel launches, and bf16 measured slower than "
                        "TF32 on an H100; on a CPU without native bf16 it is emulated and 10x slower. "
                        "Worth trying for larger images or models")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (a one-off cost of 10-30 s); at MNIST size it "
                        "measured no faster than eager on an H100, where --cuda_graph is what helps")
    p.add_argument("--cuda_graph", choices=("auto", "on", "off"), default="auto",
                   help="replay each training step as one CUDA graph: auto = on for CUDA without "
                        "--compile, where it makes an MNIST epoch several times faster")
    p.add_argument("--seed", type=int, default=0, help="random seed for initialisation, batches and z")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto takes cuda, then mps, then cpu")
    p.add_argument("--out_dir", default="outputs/{model}",
                   help="folder for figures, metrics.csv, config.json and checkpoint.pt; "
                        "{model} is replaced by --model")
    p.add_argument("--interpolate", type=int, nargs=2, default=[4, 9], metavar=("A", "B"),
                   help="interpolate between the first test images of digits A and B")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.out_dir = args.out_dir.replace("{model}", args.model)
    return args


def main(argv=None):
    """Run the command line with `argv` (default: sys.argv[1:]).

    Returns the metrics history (one dict per epoch). A bad argument or input
    prints one sentence to stderr and raises SystemExit with a non-zero code
    (2 for input errors).
    """
    args = parse_args(argv)
    try:
        return train(args)[1]
    except UserError as e:
        print(f"vae.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
