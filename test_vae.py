"""Tests for vae.py, in two parts like the file. First the specification of the VAE (Part 1):
shapes, the KL and the likelihoods against torch.distributions, gradients, the loss parts, the
importance-weighted bound against the ELBO, and Part 1 copied alone. Then the tool (Part 2): data,
the command line, runs end to end on small data the tests write themselves, checkpoints, faults,
and 2 processes under torchrun (gloo). CPU only where no GPU is present; run with
`python -m pytest -q -n 2`."""

import csv
import functools
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.distributions import Bernoulli, Normal
from torch.distributions import kl_divergence as torch_kl

import vae

HERE = os.path.dirname(os.path.abspath(__file__))
# The suite runs as two workers on two cores: one thread each, in them and in the runs they start,
# keeps the workers from spinning against each other (2 min 50 s becomes 2 min 5 s).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


# ----------------------------------------------------------------------------
# Helpers: small data in MNIST's original format, and the command line in a subprocess


def write_idx(path, tensor):
    """Write a uint8 tensor as an IDX file (magic 0x0000 08 <ndim>, big-endian sizes)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | tensor.dim()))
        f.write(struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.contiguous().numpy().tobytes())


def fake_digits(n, seed):
    """n 28x28 uint8 images of 10 classes: each class is a fixed random stroke pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, 7, 7, generator=torch.Generator().manual_seed(123)) > 0.6).float()
    templates = F.interpolate(templates[:, None], size=(20, 20), mode="bilinear")[:, 0]
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 28, 28)
    images[:, 4:24, 4:24] = templates[labels]
    images = (images + 0.1 * torch.rand(n, 28, 28, generator=g)).clamp(0, 1)
    return (images * 255).to(torch.uint8), labels.to(torch.uint8)


def write_small_mnist(root, n_train=64, n_test=32):
    """Write the four IDX files of a small fake MNIST under root/MNIST/raw; returns that folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_small_mnist(root, n_train=320, n_test=120)
    return str(root)


def to_float_batch(images_uint8):
    return vae.to_float(images_uint8[:, None])  # (N, 28, 28) -> (N, 1, 28, 28)


# ----------------------------------------------------------------------------
# The specification (Part 1): the models


RESIDUAL = functools.partial(vae.ConvVAE, res_blocks=2)  # residual blocks at the lowest resolution
MODELS = [vae.ConvVAE, RESIDUAL, vae.MLPVAE]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("size", vae.IMAGE_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_ranges(cls, size, channels):
    torch.manual_seed(0)
    model = cls(image_size=size, channels=channels, latent_dim=8)
    x = torch.rand(3, channels, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 8)
    z = model.reparameterize(mu, logvar)
    assert z.shape == (3, 8)
    x_hat = model.decode(z)
    assert x_hat.shape == x.shape
    assert x_hat.min() >= 0 and x_hat.max() <= 1
    out, mu2, logvar2 = model(x)
    assert out.shape == x.shape and mu2.shape == logvar2.shape == (3, 8)
    assert out.min() >= 0 and out.max() <= 1
    logits = model(x, return_logits=True)[0]
    assert logits.shape == x.shape
    samples = model.sample(5)
    assert samples.shape == (5, channels, size, size)
    assert samples.min() >= 0 and samples.max() <= 1 and not samples.requires_grad


def test_forward_logits_are_the_images_before_sigmoid():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=4).eval()
    x = torch.rand(2, 1, 28, 28)
    torch.manual_seed(1)
    x_hat, _, _ = model(x)
    torch.manual_seed(1)
    logits, _, _ = model(x, return_logits=True)
    torch.testing.assert_close(torch.sigmoid(logits), x_hat)


def test_conv_depth_follows_image_size_and_refuses_other_sizes():
    assert vae.ConvVAE(image_size=28).feature_shape == (64, 7, 7)
    blocks = [m for m in RESIDUAL().modules() if isinstance(m, vae.ResidualBlock)]
    assert len(blocks) == 4 and all(b.f[0].in_channels == 64 for b in blocks)  # at 7 x 7, 2 a side
    x = torch.rand(3, 64, 7, 7)
    blocks[0].f[-1].weight.data.zero_()  # f(x) = BatchNorm's bias, 0: the block is LeakyReLU(x)
    torch.testing.assert_close(blocks[0](x), F.leaky_relu(x, 0.2))
    assert vae.ConvVAE(image_size=32).feature_shape == (128, 4, 4)
    assert vae.ConvVAE(image_size=64).feature_shape == (256, 4, 4)
    for size, blocks in ((30, 0), (12, 0), (28, -1)):
        with pytest.raises(ValueError, match="multiple of 4 and at least 16, and res_blocks >= 0"):
            vae.ConvVAE(image_size=size, res_blocks=blocks)


@pytest.mark.parametrize("training", [True, False])
def test_sampling_and_evaluation_leave_the_mode_and_every_buffer_as_they_found_them(training):
    torch.manual_seed(0)
    model = vae.ConvVAE(latent_dim=4).train(training)
    model(torch.rand(8, 1, 28, 28))  # moves BatchNorm's running statistics away from their start
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = model.sample(16)
    x = torch.rand(4, 1, 28, 28)
    vae.log_likelihood(model, x, k=3)  # and the other evaluations: eval mode, buffers untouched
    vae.interpolate(model, x[0], x[1])
    vae.evaluate(model, x)
    assert model.training == training and samples.shape == (16, 1, 28, 28)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cls", [vae.ConvVAE, vae.MLPVAE])
def test_conditional_shapes_and_the_label_changes_the_image(cls):
    torch.manual_seed(0)
    model = cls(image_size=32, channels=3, latent_dim=6, num_classes=4).eval()
    x, y = torch.rand(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0])
    x_hat, mu, logvar = model(x, y)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (5, 6)
    assert model.fc_mu.in_features == model.fc_logvar.in_features == model.encoder(x).shape[1] + 4
    assert model.sample(4, torch.arange(4)).shape == (4, 3, 32, 32)
    torch.testing.assert_close(
        model.encode(x, y.int())[0], model.encode(x, y)[0]
    )  # any integer labels
    with pytest.raises(ValueError, match="needs the class labels y"):
        model.encode(x)
    z = torch.randn(1, 6).repeat(4, 1)
    images = model.decode(z, torch.arange(4))  # one z, four labels
    assert all((images[i] - images[0]).abs().mean() > 1e-3 for i in range(1, 4))
    one_hot = F.one_hot(torch.arange(4), 4).float()  # float labels are used as given
    torch.testing.assert_close(model.decode(z, one_hot), images)
    mu_a = model.encode(x, y)[0]
    assert (model.encode(x, (y + 1) % 4)[0] - mu_a).abs().max() > 1e-4  # the encoder sees y too


# ----------------------------------------------------------------------------
# The specification: the loss, checked against torch.distributions


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 10) * 2, torch.randn(16, 10)
    expected = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    assert vae.kl_divergence(mu, logvar).shape == (16,)
    zeros = torch.zeros(4, 6)  # 0 at the prior, positive elsewhere
    assert torch.equal(vae.kl_divergence(zeros, zeros), torch.zeros(4))
    assert (vae.kl_divergence(zeros + 0.5, zeros) > 0).all()
    assert (vae.kl_divergence(zeros, zeros - 1) > 0).all()


def test_bernoulli_reconstruction_is_the_bernoulli_log_likelihood_from_stable_logits():
    torch.manual_seed(0)
    logits, x = torch.randn(4, 1, 28, 28) * 3, torch.rand(4, 1, 28, 28)
    # Bernoulli.log_prob is -BCE for x in [0, 1] too; validation would insist on x in {0, 1}
    expected = -Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(
        vae.reconstruction_loss(logits, x, "bernoulli"), expected, rtol=1e-5, atol=1e-3
    )
    logits = torch.full((1, 1, 2, 2), 40.0)  # sigmoid rounds to exactly 1.0 in float32
    x = torch.zeros(1, 1, 2, 2)
    rec = vae.reconstruction_loss(logits, x, "bernoulli")
    torch.testing.assert_close(rec, torch.tensor([160.0]))  # 4 pixels x 40 nats, unclipped
    with pytest.raises(ValueError, match="'bernoulli' or 'gaussian'"):
        vae.reconstruction_loss(logits, x, "bce")


@pytest.mark.parametrize("sigma", [1.0, 0.1, 0.02])
def test_gaussian_reconstruction_is_the_normal_density_with_its_constant(sigma):
    torch.manual_seed(0)
    logits, x = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    nll = -Normal(torch.sigmoid(logits), sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(vae.reconstruction_loss(logits, x, "gaussian", sigma), nll)


def test_gaussian_sigma_weighs_the_reconstruction_as_one_over_beta():
    # recon + kl at sigma is (1 / sigma^2) (squared error / 2 + sigma^2 kl) + a constant: the
    # gradient of the Gaussian ELBO at sigma is that of the squared-error loss with beta = sigma^2.
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    x = torch.rand(8, 1, 28, 28)
    mu, logvar = model.encode(x)
    logits = model.decode_logits(mu)
    sigma = 0.2
    loss = vae.vae_loss(logits, x, mu, logvar, 1.0, "gaussian", sigma)[0]
    squared = (x - torch.sigmoid(logits)).pow(2).flatten(1).sum(1).mean() / 2
    beta_form = squared + sigma**2 * vae.kl_divergence(mu, logvar).mean()
    grads = [
        torch.autograd.grad(f, model.fc_mu.weight, retain_graph=True)[0] for f in (loss, beta_form)
    ]
    torch.testing.assert_close(grads[0] * sigma**2, grads[1])


def test_every_part_one_function_refuses_float_images_outside_0_1_and_takes_uint8():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    optimizer = torch.optim.Adam(model.parameters())
    logits, mu, logvar = torch.zeros(2, 1, 28, 28), torch.zeros(2, 3), torch.zeros(2, 3)
    calls = {
        "vae_loss": lambda x: vae.vae_loss(logits, x, mu, logvar),
        "train_step": lambda x: vae.train_step(model, optimizer, x),
        "evaluate": lambda x: vae.evaluate(model, x),
        "log_likelihood": lambda x: vae.log_likelihood(model, x, 2),
        "reconstruct": lambda x: vae.reconstruct(model, x),
        "interpolate": lambda x: vae.interpolate(model, x[0], x[1]),
    }
    images = fake_digits(2, seed=3)[0][:, None]  # (2, 1, 28, 28) uint8
    for call in calls.values():
        for bad in (images.float(), images.float() / 255 - 0.5):  # 0-255 floats; below 0
            with pytest.raises(ValueError, match=r"floats in \[0, 1\].*divide 0-255"):
                call(bad)
        call(images)  # uint8, and the same in [0, 1]: no error
        call(vae.to_float(images))
    images_loss = vae.vae_loss(logits, images, mu, logvar)[0]
    assert images_loss == vae.vae_loss(logits, vae.to_float(images), mu, logvar)[0], "uint8 as /255"


def test_loss_parts_add_up_and_beta_scales_only_the_kl():
    torch.manual_seed(0)
    logits, x = torch.randn(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    mu, logvar = torch.randn(8, 5), torch.randn(8, 5)
    _, rec1, kl1 = vae.vae_loss(logits, x, mu, logvar, beta=1.0)
    assert kl1 > 0 and rec1 > 0
    for beta in (0.0, 0.5, 1.0, 4.0):
        loss, rec, kl = vae.vae_loss(logits, x, mu, logvar, beta=beta)
        torch.testing.assert_close(loss, rec + beta * kl)
        assert torch.equal(rec, rec1) and torch.equal(kl, kl1)
    # each part is a batch mean of the per-image values, in nats per image
    torch.testing.assert_close(rec1, vae.reconstruction_loss(logits, x).mean())
    torch.testing.assert_close(kl1, vae.kl_divergence(mu, logvar).mean())


def test_free_bits_change_the_gradient_only_under_the_floor():
    torch.manual_seed(0)
    logits, x = torch.randn(16, 1, 4, 4), torch.rand(16, 1, 4, 4)
    mu = torch.cat(
        [torch.randn(16, 2) * 2, torch.randn(16, 2) * 0.05], dim=1
    )  # dims 2, 3 near the prior
    logvar = torch.cat([torch.full((16, 2), -2.0), torch.full((16, 2), -0.01)], dim=1)
    kl_dims = vae.kl_per_dimension(mu, logvar).mean(0)
    floor = 0.5
    assert (kl_dims[:2] > floor).all() and (kl_dims[2:] < floor).all()
    grads = {}
    for fb in (0.0, floor):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        loss, rec, kl = vae.vae_loss(logits, x, m, lv, free_bits=fb)
        loss.backward()
        grads[fb] = (m.grad, lv.grad, loss.item(), kl.item())
    (gm0, glv0, loss0, kl0), (gm1, glv1, loss1, kl1) = grads[0.0], grads[floor]
    torch.testing.assert_close(gm1[:, :2], gm0[:, :2])  # above the floor: unchanged
    torch.testing.assert_close(glv1[:, :2], glv0[:, :2])
    assert (gm1[:, 2:] == 0).all() and (glv1[:, 2:] == 0).all()  # under it: no pull to the prior
    assert (gm0[:, 2:] != 0).any()
    assert kl1 == kl0  # the reported KL is the true one
    assert loss1 == pytest.approx(loss0 + 2 * floor - kl_dims[2:].sum().item(), rel=1e-5)


def test_logvar_is_clamped_before_exp():
    model = vae.MLPVAE(latent_dim=3)
    with torch.no_grad():
        model.fc_logvar.bias.fill_(1000.0)  # exp(1000) is inf in float32
    x = torch.rand(2, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert logvar.max().item() == vae.LOGVAR_RANGE[1]
    logits, mu, logvar = model(x, return_logits=True)
    loss = vae.vae_loss(logits, x, mu, logvar)[0]
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------
# The specification: gradients and training


def test_reparameterize_passes_gradients_to_mu_and_logvar():
    torch.manual_seed(0)
    mu = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    model = vae.MLPVAE(latent_dim=3)
    torch.manual_seed(7)
    z = model.reparameterize(mu, logvar)
    z.sum().backward()
    torch.manual_seed(7)
    eps = torch.randn(4, 3)
    torch.testing.assert_close(mu.grad, torch.ones(4, 3))  # dz/dmu = 1
    torch.testing.assert_close(
        logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps
    )  # dz/dlogvar


@pytest.mark.parametrize("cls", MODELS)
def test_every_parameter_gets_a_finite_nonzero_gradient(cls):
    torch.manual_seed(0)
    model = cls(latent_dim=8)
    x = torch.rand(16, 1, 28, 28)
    logits, mu, logvar = model(x, return_logits=True)
    vae.vae_loss(logits, x, mu, logvar)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [vae.ConvVAE, vae.MLPVAE])
def test_optimizer_steps_on_one_batch_lower_the_loss(cls):
    torch.manual_seed(0)
    model = cls(latent_dim=8)
    x = to_float_batch(fake_digits(32, seed=3)[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        logits, mu, logvar = model(x, return_logits=True)
        loss = vae.vae_loss(logits, x, mu, logvar)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def test_grad_clip_bounds_the_update_and_reports_the_norm():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.rand(8, 1, 28, 28)
    stats = vae.train_step(model, optimizer, x, beta=1.0, grad_clip=1e-3)
    clipped = (
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if hasattr(torch.nn.utils, "get_total_norm")
        else torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    )
    assert stats[3].item() > 1e-3  # the norm before clipping
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_kl_warmup_schedule_counts_epochs_from_one_and_refuses_bad_values():
    betas = [vae.beta_schedule(e, 0.5, kl_warmup=4) for e in range(1, 8)]
    assert betas == [0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [vae.beta_schedule(e, 2.0) for e in (1, 5)] == [2.0, 2.0]
    for epoch, beta, warmup in ((0, 1.0, 3), (1, -0.5, 0), (2, 1.0, -1)):
        with pytest.raises(ValueError, match="epochs count from 1"):
            vae.beta_schedule(epoch, beta, warmup)


def test_cosine_lr_schedule_falls_from_lr_by_half_a_cosine_and_set_lr_fills_tensors():
    lrs = [vae.lr_schedule(e, 0.002, 4, "cosine") for e in range(1, 5)]
    expected = [0.002, 0.001 * (1 + math.sqrt(0.5)), 0.001, 0.001 * (1 - math.sqrt(0.5))]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert [vae.lr_schedule(e, 0.002, 4) for e in (1, 4)] == [0.002, 0.002]
    for epoch, schedule in ((0, "cosine"), (5, "cosine"), (1, "step")):
        with pytest.raises(ValueError, match="lr_schedule needs"):
            vae.lr_schedule(epoch, 0.002, 4, schedule)
    weight = torch.nn.Parameter(torch.ones(2))
    lr = torch.tensor(0.1)
    optimizer = torch.optim.Adam([weight], lr=lr, fused=True)
    vae.set_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.25  # the same tensor, filled
    weight.grad = torch.ones(2)
    optimizer.step()  # Adam's first step moves each weight by lr
    assert weight.detach() == pytest.approx([0.75, 0.75])


def test_train_epoch_refuses_a_negative_beta_or_free_bits_before_any_step():
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters())
    images = fake_digits(8, seed=1)[0][:, None]
    for kwargs in (dict(beta=-1.0), dict(free_bits=-0.5)):
        with pytest.raises(ValueError, match="beta and free_bits must be >= 0"):
            vae.train_epoch(model, optimizer, images, batch_size=4, **kwargs)
    for kwargs in (dict(beta=0.5), dict(free_bits=0.1)):  # the IWAE bound has neither
        with pytest.raises(ValueError, match="the IWAE objective has beta 1 and no free bits"):
            vae.train_epoch(model, optimizer, images, batch_size=4, iwae_samples=3, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_epoch_takes_other_steps_orders_and_callbacks():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    optimizer = torch.optim.Adam(model.parameters())
    images, seen, calls = fake_digits(10, seed=1)[0][:, None], [], []

    def step(model, optimizer, x, beta, y=None, **kwargs):
        seen.append(x.clone())
        return vae.train_step(model, optimizer, x, beta, y, **kwargs)

    order = torch.tensor([9, 8, 7, 6, 5])  # half the images, in this order
    stats = vae.train_epoch(
        model,
        optimizer,
        images,
        batch_size=2,
        step=step,
        order=order,
        on_step=lambda i, s: calls.append((i, s.shape)),
    )
    assert [len(x) for x in seen] == [2, 2, 1] and calls == [(1, (4,)), (2, (4,)), (3, (4,))]
    assert torch.equal(torch.cat(seen), vae.to_float(images[order]))
    assert set(stats) == {"loss", "recon", "kl"} and all(math.isfinite(v) for v in stats.values())


def test_conditional_decoder_learns_what_the_label_means():
    # Class 0 is dark and class 1 bright; the images carry nothing else. After training,
    # decoding the same z from the prior must give dark images for y = 0, bright for y = 1.
    torch.manual_seed(0)
    model = vae.MLPVAE(image_size=8, channels=1, latent_dim=2, hidden=(32, 16), num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        y = torch.randint(0, 2, (64,))
        x = (0.1 + 0.8 * y.float()).view(-1, 1, 1, 1) + 0.05 * torch.rand(64, 1, 8, 8)
        logits, mu, logvar = model(x, y, return_logits=True)
        loss = vae.vae_loss(logits, x, mu, logvar)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(16, 2)
    with torch.no_grad():
        dark, bright = (
            model.decode(z, torch.zeros(16, dtype=torch.long)),
            model.decode(z, torch.ones(16, dtype=torch.long)),
        )
    assert dark.mean() < 0.25 and bright.mean() > 0.75


def test_a_short_training_learns_what_the_classic_bugs_would_break():
    # Checked with formulas of its own, not through vae_loss or evaluate. A loss fed
    # probabilities instead of logits, or a reconstruction averaged over pixels (a beta of 784),
    # leaves the KL near 0 and decode(mu) at the mean image; a flipped KL sign sends it off.
    torch.manual_seed(0)
    images = (fake_digits(320, seed=6)[0][:, None] > 127).to(torch.uint8) * 255  # binary
    model = vae.MLPVAE(latent_dim=4, hidden=(128,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        vae.train_epoch(model, optimizer, images, batch_size=32)
    x = images.float() / 255
    with torch.no_grad():
        mu, logvar = model.eval().encode(x)
        x_hat = torch.sigmoid(model.decode_logits(mu))
    errors = ((x_hat > 0.5) != (x > 0.5)).float().mean().item()  # wrong pixels of decode(mu)
    mean_image_errors = ((x.mean(0) > 0.5) != (x > 0.5)).float().mean().item()
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1).mean().item()  # nats per image
    assert errors < 0.25 * mean_image_errors, (errors, mean_image_errors)
    assert 2 < kl < 40, kl


# ----------------------------------------------------------------------------
# The specification: evaluation, the log-likelihood (IWAE >= ELBO), generation


def test_evaluate_is_repeatable_and_never_moves_the_global_random_stream():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=4).train()
    images = fake_digits(50, seed=4)[0][:, None]
    state = torch.get_rng_state()
    a = vae.evaluate(model, images, batch_size=16)
    b = vae.evaluate(model, images, batch_size=16)
    assert a == b  # bit for bit: each call draws z from a generator of its own
    assert torch.equal(torch.get_rng_state(), state) and model.training
    c = vae.evaluate(model, images, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert a["recon"] != c["recon"]  # z is drawn from q(z|x), not set to mu
    assert a["kl"] == pytest.approx(c["kl"])  # the KL is in closed form, no sampling
    assert a["neg_elbo"] == pytest.approx(a["recon"] + a["kl"])
    assert set(a) == {"neg_elbo", "recon", "kl", "active_units", "kl_per_dim", "mu_var"}
    assert sum(a["kl_per_dim"]) == pytest.approx(a["kl"], rel=1e-5) and len(a["kl_per_dim"]) == 4


def test_evaluating_between_epochs_does_not_change_the_weights_training_reaches():
    images = fake_digits(64, seed=2)[0][:, None]
    weights = []
    for evaluate_between in (False, True):
        torch.manual_seed(0)
        model = vae.ConvVAE(latent_dim=4, base_channels=4)
        optimizer = torch.optim.Adam(model.parameters())
        for _ in range(2):  # epochs
            vae.train_epoch(model, optimizer, images, batch_size=16, binarize=True)
            if evaluate_between:
                vae.evaluate(model, images)
                vae.log_likelihood(model, images[:4], 3)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_active_units_count_the_dimensions_that_vary_across_images():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=6)
    with torch.no_grad():
        model.fc_mu.weight[2:] = 0  # mu_2..5 = bias for every image: inactive
        model.fc_mu.weight[:2] *= 50  # mu_0, mu_1 vary strongly across images
    stats = vae.evaluate(model, fake_digits(100, seed=11)[0][:, None], batch_size=32)
    assert stats["active_units"] == 2


def test_log_likelihood_with_one_sample_is_the_elbo_on_average():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=4).eval()
    x = torch.bernoulli(to_float_batch(fake_digits(8, seed=7)[0]))
    reps = 400
    g = torch.Generator().manual_seed(1)  # one stream for all the repetitions
    iw = torch.stack([vae.log_likelihood(model, x, k=1, generator=g) for _ in range(reps)])
    elbo = []
    with torch.no_grad():
        for _ in range(reps):
            logits, mu, logvar = model(x, return_logits=True)
            elbo.append(-(vae.reconstruction_loss(logits, x) + vae.kl_divergence(mu, logvar)))
    elbo = torch.stack(elbo)
    se = (iw.var(0) / reps + elbo.var(0) / reps).sqrt()
    assert ((iw.mean(0) - elbo.mean(0)).abs() < 4 * se).all()


def test_log_likelihood_uses_the_gaussian_of_the_model_and_takes_one_hot_labels():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(32,), num_classes=4)
    x = vae.to_float(fake_digits(6, seed=3)[0][:, None])
    y = torch.tensor([0, 1, 2, 3, 0, 1])

    def normal(logits, target):  # the same likelihood, written with torch.distributions
        return Normal(torch.sigmoid(logits), 0.1).log_prob(target).flatten(1).sum(1)

    ours = vae.log_likelihood(model, x, 7, y, "gaussian", 0.1, max_decodes=12)  # 2 per chunk
    torch.testing.assert_close(
        ours, vae.log_likelihood(model, x, 7, y, max_decodes=12, log_px_given_z=normal)
    )
    one_hot = F.one_hot(y, 4).float()
    assert torch.equal(
        ours, vae.log_likelihood(model, x, 7, one_hot, "gaussian", 0.1, max_decodes=12)
    )
    assert not torch.allclose(ours, vae.log_likelihood(model, x, 7, y, max_decodes=12))  # Bernoulli


def test_iwae_loss_with_one_sample_is_the_elbo_with_a_sampled_kl_and_trains_the_encoder():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    x = torch.bernoulli(to_float_batch(fake_digits(5, seed=4)[0]))
    torch.manual_seed(1)
    loss, rec, kl = vae.iwae_loss(model, x, 1)
    torch.manual_seed(1)  # the same eps, and the ELBO of that z written with torch.distributions
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(1, 5, 3)[0]
    log_px_z = Bernoulli(logits=model.decode_logits(z)).log_prob(x).flatten(1).sum(1)
    log_w = log_px_z + Normal(0, 1).log_prob(z).sum(1) - Normal(mu, std).log_prob(z).sum(1)
    torch.testing.assert_close(loss, -log_w.mean())
    torch.testing.assert_close(rec, -log_px_z.mean())
    torch.testing.assert_close(kl, torch_kl(Normal(mu, std), Normal(0, 1)).sum(1).mean())
    loss.backward()  # the gradient reaches the encoder through z, mu and logvar
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # log q - log p, the sampled KL, averages to the closed form: 4000 draws per image
    with torch.no_grad():
        log_w, log_px_z = vae.log_weights(model, x, mu, logvar, 4000)  # (4000, 5)
    sampled_kl = log_px_z - log_w
    se = sampled_kl.std(0) / math.sqrt(4000)
    assert ((sampled_kl.mean(0) - vae.kl_divergence(mu, logvar)).abs() < 4 * se).all()
    # the bound with K = 20 is above the K = 1 bound, on average over the same draws
    bound_20 = torch.logsumexp(log_w.view(200, 20, 5), dim=1) - math.log(20)
    assert (bound_20.mean(0) > log_w.mean(0)).all()


def test_training_the_iwae_bound_lowers_it():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=4, hidden=(64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = fake_digits(64, seed=2)[0][:, None]
    x = torch.bernoulli(to_float_batch(images[:, 0]))

    def bound():
        return vae.log_likelihood(model, x, 5, generator=torch.Generator().manual_seed(0)).mean()

    before = bound()
    for _ in range(20):
        stats = vae.train_step(model, optimizer, x, iwae_samples=5)
    assert bound() > before + 10
    assert torch.isfinite(stats).all() and stats[0] <= stats[1] + stats[2] + 1  # -IWAE <~ -ELBO


def test_log_likelihood_rises_with_k():
    torch.manual_seed(0)
    model = vae.ConvVAE(latent_dim=4).eval()
    x = torch.bernoulli(to_float_batch(fake_digits(16, seed=8)[0]))
    estimates = [
        vae.log_likelihood(model, x, k=k, max_decodes=16 * 7).mean().item()
        for k in (1, 10, 100, 400)
    ]
    assert all(a < b for a, b in zip(estimates, estimates[1:])), estimates
    with pytest.raises(ValueError, match="needs k >= 1"):
        vae.log_likelihood(model, x, k=0)


class LinearGaussian(torch.nn.Module):
    """z ~ N(0, I), x | z ~ N(W z + b, s^2 I): log p(x) is Gaussian in closed form. Its data lies
    around 0.5, well inside [0, 1], where log_likelihood takes images."""

    def __init__(self, d_x=6, d_z=2, s=0.05):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = 0.05 * torch.randn(d_x, d_z, generator=g)
        self.b = 0.5 + 0.1 * torch.randn(d_x, generator=g)
        self.s = s
        self.latent_dim = d_z
        # the exact posterior is N(A (x - b), S): encode returns a deliberately wrong q instead
        cov = torch.linalg.inv(torch.eye(d_z) + self.W.T @ self.W / s**2)
        self.A, self.cov = cov @ self.W.T / s**2, cov

    def encode(self, x):
        x = x.flatten(1)
        mu = (x - self.b) @ self.A.T * 0.7  # shrunk mean
        logvar = torch.log(torch.diagonal(self.cov) * 2.0).expand_as(mu)  # wider, diagonal
        return mu, logvar

    def decode_logits(self, z):  # here the Gaussian mean, shaped like an image (N, 1, 1, d_x)
        return (z @ self.W.T + self.b)[:, None, None, :]

    def log_px_given_z(self, mean, x):
        return Normal(mean, self.s).log_prob(x).flatten(1).sum(1)

    def exact(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(len(self.b))
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.flatten(1))


def test_log_likelihood_converges_to_the_exact_value_on_a_linear_gaussian_model():
    torch.manual_seed(0)
    model = LinearGaussian()
    x = torch.randn(5, 2) @ model.W.T + model.b + model.s * torch.randn(5, 6)
    x = x.clamp(0, 1)[:, None, None, :]  # (5, 1, 1, 6): images of 6 pixels
    exact = model.exact(x)
    g = torch.Generator().manual_seed(1)
    estimate = functools.partial(vae.log_likelihood, model, x, log_px_given_z=model.log_px_given_z)
    elbo = torch.stack([estimate(k=1, generator=g) for _ in range(200)]).mean(0)  # E[1 sample]
    many = estimate(k=20000, max_decodes=4096)
    assert (exact - many).abs().max() < 0.02
    assert (exact - elbo > 0.1).all()  # the ELBO is a visibly looser lower bound


@pytest.mark.parametrize("cls", [vae.ConvVAE, vae.MLPVAE])
def test_interpolate_runs_between_the_decoded_means_of_single_images_of_either_shape(cls):
    torch.manual_seed(0)
    model = cls(latent_dim=4).train()
    model(torch.rand(8, 1, 28, 28))
    x_a, x_b = torch.rand(1, 28, 28), torch.rand(1, 28, 28)
    path = vae.interpolate(model, x_a, x_b, steps=7)
    assert path.shape == (7, 1, 28, 28) and model.training
    assert torch.equal(vae.interpolate(model, x_a[None], x_b[None], steps=7), path)  # (1, C, H, W)
    with pytest.raises(ValueError, match="single images"):
        vae.interpolate(model, torch.rand(2, 1, 28, 28), x_b)
    model.eval()
    with torch.no_grad():
        mu = model.encode(torch.stack([x_a, x_b]))[0]
        ends, middle = model.decode(mu), model.decode(mu.mean(0, keepdim=True))
    torch.testing.assert_close(path[0], ends[0])
    torch.testing.assert_close(path[-1], ends[1])
    torch.testing.assert_close(path[3], middle[0])  # the straight line between the means


def test_reconstruct_decodes_the_posterior_mean_in_eval_mode():
    torch.manual_seed(0)
    model = vae.ConvVAE(latent_dim=4, base_channels=8).train()
    images = fake_digits(4, seed=5)[0][:, None]
    x_hat = vae.reconstruct(model, images)
    assert model.training and x_hat.shape == (4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        expected = model.decode(model.encode(vae.to_float(images))[0])
    assert torch.equal(x_hat, expected)


@pytest.mark.parametrize(
    "model",
    [
        vae.MLPVAE(hidden=(300,), latent_dim=5),
        vae.ConvVAE(base_channels=8, latent_dim=3),
        vae.ConvVAE(image_size=32, channels=3, base_channels=4, latent_dim=2, num_classes=3),
        vae.ConvVAE(base_channels=4, latent_dim=2, res_blocks=1),
    ],
)
def test_save_model_and_load_model_round_trip_any_model(tmp_path, model):
    model.eval()
    vae.save_model(tmp_path / "m.pt", model, note="mine")
    loaded, state = vae.load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model) and loaded.model_args == model.model_args
    assert state["note"] == "mine" and not loaded.training
    x = torch.rand(2, model.channels, model.image_size, model.image_size)
    y = torch.tensor([0, 2]) if model.num_classes else None
    assert torch.equal(vae.reconstruct(loaded, x, y), vae.reconstruct(model, x, y))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="names no model class"):
        vae.load_model(tmp_path / "other.pt")


def test_a_convvae_saved_before_residual_blocks_loads_as_the_plain_model(tmp_path):
    model = vae.ConvVAE(base_channels=4, latent_dim=2).eval()
    vae.save_model(tmp_path / "old.pt", model)
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    del state["model_args"]["res_blocks"]  # as vae.py wrote it before this argument
    torch.save(state, tmp_path / "old.pt")
    loaded, _ = vae.load_model(tmp_path / "old.pt")
    assert loaded.model_args["res_blocks"] == 0
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(vae.reconstruct(loaded, x), vae.reconstruct(model, x))


def test_part_one_copied_alone_trains_samples_and_interpolates(tmp_path):
    source = open(os.path.join(HERE, "vae.py")).read()
    part1 = source[: source.index("\n# Part 2:")]
    (tmp_path / "myvae.py").write_text(part1)
    torch.save(fake_digits(256, seed=13)[0][:, None], tmp_path / "images.pt")
    code = """
import importlib.abc, importlib.machinery, json, sys
class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # the tool's libraries are absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "PIL", "matplotlib", "tqdm"):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}")
sys.meta_path.insert(0, NotInstalled())
import torch
import myvae
torch.manual_seed(0)
images = torch.load("images.pt")
model = myvae.ConvVAE(image_size=28, channels=1, latent_dim=8, res_blocks=1)  # the command line's model
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
losses = []
for e in range(1, 6):
    myvae.set_lr(optimizer, myvae.lr_schedule(e, 2e-3, 5, "cosine"))
    beta = myvae.beta_schedule(e, 1.0, 2)
    losses.append(myvae.train_epoch(model, optimizer, images, batch_size=32, beta=beta)["loss"])
test = myvae.evaluate(model, images[:64])
nll = myvae.log_likelihood(model, images[:4], k=10)
path = myvae.interpolate(model, images[0], images[1], steps=5)
myvae.save_model("model.pt", model)
loaded, _ = myvae.load_model("model.pt")
same = torch.equal(myvae.reconstruct(loaded, images[:4]), myvae.reconstruct(model, images[:4]))
print(json.dumps(dict(losses=losses, test=test["neg_elbo"], nll=nll.tolist(), samples=list(model.sample(3).shape),
                      path=list(path.shape), same=same,
                      loaded=sorted({"torchvision", "PIL", "matplotlib", "tqdm"} & set(sys.modules)))))
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["losses"][-1] < 0.7 * out["losses"][0], out["losses"]
    assert math.isfinite(out["test"]) and all(v < 0 for v in out["nll"])
    assert out["samples"] == [3, 1, 28, 28] and out["path"] == [5, 1, 28, 28]
    assert out["same"] and out["loaded"] == []


# ----------------------------------------------------------------------------
# The tool (Part 2): helpers. Runs happen in this process (`run_main`); a subprocess only where the
# process boundary is what is tested: a fresh import, signals, kill -9, torchrun, a clean clone.


def quick_run(mnist_dir, out, *extra):
    """The argv of a small, fast MLP run on the test's MNIST into `out`."""
    small = "--model mlp --latent_dim 4 --width 4 --batch_size 64 --device cpu".split()
    return ["--data_dir", str(mnist_dir), "--out_dir", str(out), *small, *map(str, extra)]


def folder_run(data, out, *extra):
    """The argv of a small conv run on an image folder into `out`."""
    small = "--dataset folder --image_size 32 --latent_dim 2 --width 4 --batch_size 16".split()
    return [*small, "--device", "cpu", "--data_dir", str(data), "--out_dir", str(out), *extra]


def run_main(argv, capsys):
    """vae.main(argv) here: (exit code, stdout, stderr), code 0 when it returns."""
    capsys.readouterr()
    try:
        vae.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(code, err, expected_code=2):
    """The outcome of bad input: one line after 'vae.py: error:', no traceback."""
    lines = err.strip().splitlines()
    return code == expected_code and len(lines) == 1 and lines[0].startswith("vae.py: error: ")


def cli(args, cwd=None, env=None):
    """`python vae.py ARGS` in a subprocess: (exit code, stdout, stderr)."""
    argv = [sys.executable, os.path.join(HERE, "vae.py"), *map(str, args)]
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def torchrun(nproc, args, cwd):
    """`torchrun --standalone --nproc_per_node=N vae.py ARGS`: (exit code, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # N processes on a small machine
    env.update(PYTHONFAULTHANDLER="1")  # a process that aborts prints where it was
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv = [*run, f"--nproc_per_node={nproc}", os.path.join(HERE, "vae.py"), *map(str, args)]
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def wait_for(path, proc, seconds=120):
    """Wait until `path` exists (or proc ends): the thing waited on, not a fixed time."""
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the run wrote no checkpoint"


def metrics(path):
    """metrics.csv's rows without the timing columns."""
    with open(path) as f:
        timing = ("seconds", "images_per_sec")
        return [{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader(f)]


def patch_step(monkeypatch, n, action):
    """Run action(model) after the n-th training step of this process."""
    calls, real_step = [0], vae.train_step

    def step(model, optimizer, *args, **kwargs):
        stats = real_step(model, optimizer, *args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            action(model)
        return stats

    monkeypatch.setattr(vae, "train_step", step)


def blow_up(model):
    """Every weight 1e30, as a far too large learning rate would leave them."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e30)


def capture_figures(monkeypatch):
    """Keep every matplotlib figure that vae.py draws, to read what it shows."""
    figures, make = [], vae._figure
    monkeypatch.setattr(vae, "_figure", lambda *size: figures.append(make(*size)) or figures[-1])
    return figures


def write_image_folder(
    root, classes=("circle", "square", "stripes"), per_class=12, seed=0, ext=".png"
):
    """Write per_class RGB images per class, of varied sizes and aspect ratios, each class
    a different colour and pattern; with classes None, a flat folder of 3 * per_class."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes or ("flat",) * 3):
        folder = root if classes is None else root / name
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in torch.randint(40, 90, (2,), generator=g))
            img = torch.rand(h, w, 3, generator=g) * 60
            img[..., c % 3] += 150  # the class shows in its colour channel
            if c == 2:
                img[::6] = 255
            image = Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy())
            image.save(folder / f"{name}{c}_{i:02d}{ext}")
    return root


# ----------------------------------------------------------------------------
# The tool: datasets and image folders


def test_load_mnist_reads_idx_files_resizes_once_and_binarizes_a_fixed_test_set(mnist_dir):
    data = vae.load_dataset("mnist", mnist_dir)
    assert data["train_x"].shape == (320, 1, 28, 28) and data["train_x"].dtype == torch.uint8
    assert data["test_x"].shape == (120, 1, 28, 28)
    assert data["train_y"].tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.equal(data["train_x"][:, 0], fake_digits(320, seed=0)[0])
    big = vae.load_dataset("mnist", mnist_dir, image_size=32)
    assert big["train_x"].shape == (320, 1, 32, 32) and big["train_x"].dtype == torch.uint8
    mean = data["train_x"].float().mean().item()
    assert big["train_x"].float().mean().item() == pytest.approx(mean, rel=0.02)  # brightness kept
    binary = vae.load_dataset("mnist", mnist_dir, binarize=True)["test_x"]
    assert torch.equal(binary, vae.load_dataset("mnist", mnist_dir, binarize=True)["test_x"])
    assert set(binary.unique().tolist()) <= {0, 255}
    assert binary.float().mean().item() == pytest.approx(
        data["test_x"].float().mean().item(), rel=0.05
    )


def test_binarize_draws_fresh_binary_batches_each_step():
    images = fake_digits(200, seed=10)[0][:, None]
    torch.manual_seed(0)
    idx = torch.arange(200)
    a, b = vae.get_batch(images, idx, binarize=True), vae.get_batch(images, idx, binarize=True)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    assert a.mean().item() == pytest.approx(vae.to_float(images).mean().item(), abs=0.01)
    assert torch.equal(vae.get_batch(images, idx), vae.to_float(images))


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "kmnist", "cifar10"])
def test_a_dataset_missing_offline_names_its_folder_and_files(
    tmp_path, monkeypatch, capsys, dataset
):
    # A closed local port as the proxy: every download fails at once, as offline.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    argv = ["--dataset", dataset, "--data_dir", tmp_path / "empty", "--out_dir", tmp_path / "out"]
    code, out, err = run_main(argv, capsys)
    assert one_sentence(code, err) and "is not in '" in err and "could not be downloaded" in err
    files = {"mnist": "t10k-labels-idx1-ubyte", "cifar10": "data_batch_1"}.get(dataset, "ubyte")
    assert files in err and str(tmp_path / "empty") in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong magic number"])
def test_a_damaged_idx_file_is_named_in_one_sentence(tmp_path, capsys, damage):
    raw = write_small_mnist(tmp_path / "data")
    path = raw / ("train-images-idx3-ubyte" if damage == "truncated" else "t10k-labels-idx1-ubyte")
    data = bytearray(path.read_bytes())
    path.write_bytes(data[:1000] if damage == "truncated" else b"\x00\x00\x09\x99" + data[4:])
    code, out, err = run_main(quick_run(tmp_path / "data", tmp_path / "out", "--epochs", 1), capsys)
    assert one_sentence(code, err) and f"cannot read the MNIST files in '{raw}'" in err
    assert not (tmp_path / "out").exists()


def test_other_torchvision_layouts_fashion_mnist_and_cifar10(tmp_path, monkeypatch):
    raw = write_small_mnist(tmp_path / "f")
    os.rename(raw.parent, tmp_path / "f" / "FashionMNIST")
    data = vae.load_dataset("fashion-mnist", str(tmp_path / "f"), channels=3)  # gray into RGB
    assert data["train_x"].shape == (64, 3, 28, 28) and data["classes"][0] == "T-shirt/top"
    assert all(torch.equal(data["train_x"][:, c], fake_digits(64, seed=0)[0]) for c in range(3))
    # torchvision checks each CIFAR-10 file's md5: files written here pass with that check off
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:  # the file's (N, 3072) rows
            pickle.dump({"data": images.flatten(1).numpy(), "labels": list(range(6))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    data = vae.load_dataset("cifar10", str(tmp_path / "c"))
    assert data["train_x"].shape == (30, 3, 32, 32) and torch.equal(data["test_x"], images)
    assert data["classes"][3] == "class3"
    gray = vae.load_dataset("cifar10", str(tmp_path / "c"), channels=1)["test_x"]
    pil = [
        list(Image.fromarray(im.permute(1, 2, 0).numpy()).convert("L").tobytes()) for im in images
    ]
    assert (gray.int() - torch.tensor(pil).view(6, 1, 32, 32)).abs().max() <= 1  # PIL's luma
    assert vae.load_dataset("cifar10", str(tmp_path / "c"), image_size=64)["test_x"].shape[-1] == 64


def test_load_image_crops_the_centre_square_then_resizes(tmp_path):
    img = torch.zeros(
        96, 32, 3, dtype=torch.uint8
    )  # tall: red above, green in the middle, blue below
    img[:32, :, 0] = 255
    img[32:64, :, 1] = 255
    img[64:, :, 2] = 255
    Image.fromarray(img.numpy()).save(tmp_path / "tall.png")
    rgb = vae.load_image(tmp_path / "tall.png", 32, 3)
    assert rgb.shape == (3, 32, 32) and rgb.dtype == torch.uint8
    assert rgb[1].min() == 255 and rgb[0].max() == 0 and rgb[2].max() == 0  # the green middle
    gray = vae.load_image(tmp_path / "tall.png", 16, 1)
    assert gray[0, 4:12].float().mean().item() == pytest.approx(0.587 * 255, abs=1)  # green's luma


def test_folder_splits_labels_and_sizes(tmp_path):
    write_image_folder(tmp_path / "split" / "train", per_class=6)
    write_image_folder(
        tmp_path / "split" / "val", classes=("square", "stripes"), per_class=2, seed=1
    )
    hidden = tmp_path / "split" / "train" / ".ipynb_checkpoints"  # not a class
    write_image_folder(hidden, classes=None, per_class=1)
    data = vae.load_folder(str(tmp_path / "split"), 32, 3)
    assert data["classes"] == ["circle", "square", "stripes"]
    assert data["train_x"].shape == (18, 3, 32, 32) and data["test_x"].shape == (4, 3, 32, 32)
    assert data["train_y"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert data["test_y"].tolist() == [1, 1, 2, 2]  # by the training split's class indices
    assert data["train_x"][:6, 0].float().mean() > data["train_x"][:6, 1].float().mean() + 50
    write_image_folder(tmp_path / "flat", classes=None, per_class=10)
    first = vae.load_folder(str(tmp_path / "flat"), 64, 1)
    assert (
        first["classes"] is None
        and first["train_y"] is None
        and "fixed random 10%" in first["note"]
    )
    assert first["train_x"].shape == (27, 1, 64, 64) and first["test_x"].shape == (3, 1, 64, 64)
    again = vae.load_folder(str(tmp_path / "flat"), 64, 1)
    assert torch.equal(again["test_x"], first["test_x"])  # the same split every time
    train_set = {bytes(x.flatten().tolist()) for x in first["train_x"]}
    assert not any(bytes(x.flatten().tolist()) in train_set for x in first["test_x"])


@pytest.mark.parametrize(
    "layout, size, channels, model",
    [("classes", 32, 3, "conv"), ("classes", 64, 1, "mlp"), ("flat", 64, 3, "conv")],
)
def test_a_folder_of_images_trains_one_epoch_end_to_end(tmp_path, layout, size, channels, model):
    classes = None if layout == "flat" else ("a", "b", "c")
    data = write_image_folder(tmp_path / "images", classes, ext=".jpg" if channels == 3 else ".png")
    extra = ["--image_size", size, "--channels", channels, "--model", model, "--epochs", 1]
    history = vae.main(folder_run(data, tmp_path / "out", *map(str, extra)))
    assert len(history) == 1 and math.isfinite(history[0]["test_neg_elbo"])
    loaded, state = vae.load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert (state["config"]["image_size"], state["config"]["channels"]) == (size, channels)
    assert loaded.sample(2).shape == (2, channels, size, size)
    written = set(os.listdir(tmp_path / "out"))
    assert {"samples.png", "interpolation.png", "latent_pca.png", "best_worst.png"} <= written
    labelled = layout == "classes"
    assert ("class_means.png" in written) == labelled and ("per_class.csv" in written) == labelled
    assert state["config"]["classes"] == (["a", "b", "c"] if labelled else None)


def scandir_denied(scandir, name, path):
    """os.scandir, but for a folder called `name`, whose listing is denied."""
    if os.path.basename(path) == name:
        raise PermissionError(13, "Permission denied")
    return scandir(path)


@pytest.mark.parametrize(
    "problem, sentence",
    [
        ("missing", "is not a folder"),
        ("empty", "holds 0 images"),
        ("mismatch", "do not match"),
        ("unreadable image", "cannot read the image '"),
        ("unreadable folder", "cannot list the folder '"),
        ("no labels for --conditional", "--conditional needs class labels"),
        ("over the memory", "images of 3x32x32 need 0.0 GB of memory, and 0.0 GB is available"),
        ("a huge image", "(ValueError: 300x200 pixels, over the 50,000 it reads)"),
    ],
)
def test_a_bad_folder_gets_one_sentence_and_nothing_is_written(
    tmp_path, monkeypatch, capsys, problem, sentence
):
    data = tmp_path / "images"
    extra = []
    if problem == "empty":
        data.mkdir()
    elif problem == "mismatch":
        write_image_folder(data / "train", classes=("a", "b"), per_class=2)
        write_image_folder(data / "test", classes=("a", "z"), per_class=2)
    elif problem != "missing":
        write_image_folder(
            data, classes=None if "--conditional" in problem else ("a", "b"), per_class=4
        )
    if problem == "unreadable image":
        (data / "b" / "broken.jpg").write_bytes(b"not a JPEG at all")
    elif problem == "unreadable folder":  # as chmod 0 would, for a user other than root
        monkeypatch.setattr(os, "scandir", functools.partial(scandir_denied, os.scandir, "b"))
    elif problem == "no labels for --conditional":
        extra = ["--conditional"]
    elif problem == "over the memory":
        monkeypatch.setattr(vae, "available_memory", lambda: 20_000)  # bytes: under 8 images
        monkeypatch.setattr(vae, "load_image", lambda *a: pytest.fail("an image was decoded"))
    elif problem == "a huge image":
        Image.new("RGB", (300, 200)).save(data / "b" / "big.png")
        monkeypatch.setattr(vae, "MAX_PIXELS", 50_000)
    code, out, err = run_main(folder_run(data, tmp_path / "out", "--epochs", "1", *extra), capsys)
    assert one_sentence(code, err) and sentence in err, err
    assert not (tmp_path / "out").exists()


def test_file_system_oddities_in_a_data_folder(tmp_path):
    data = write_image_folder(tmp_path / "images" / "train", classes=("a", "b"), per_class=5)
    write_image_folder(tmp_path / "images" / "val", classes=("a", "b"), per_class=1, seed=1)
    os.symlink(data / "a", data / "a" / "loop")  # a folder that contains itself
    train_file = sorted((data / "b").iterdir())[0]
    os.symlink(train_file, tmp_path / "images" / "val" / "b" / "leak.png")  # train image in val
    os.mkfifo(data / "a" / "pipe.png")  # reading it would wait forever
    loaded = vae.load_folder(str(tmp_path / "images"), 32, 3)
    assert loaded["train_x"].shape[0] == 10 and loaded["test_x"].shape[0] == 2  # each file once


@pytest.mark.parametrize(
    "mode, value, expected",
    [("I;16", 32768, 128), ("I;16", 65535, 255), ("I", 2**30, 128), ("F", 0.5, 128), ("L", 77, 77)],
)
def test_images_deeper_than_8_bits_are_scaled_by_their_range(tmp_path, mode, value, expected):
    import numpy as np

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32, "L": np.uint8}[mode]
    path = tmp_path / ("image.png" if mode in ("I;16", "L") else "image.tif")
    Image.fromarray(np.full((20, 30), value, dtype)).save(path)
    for channels in (1, 3):
        x = vae.load_image(path, 16, channels)
        assert x.shape == (channels, 16, 16) and abs(x.float().mean().item() - expected) <= 1


def test_a_very_long_image_is_never_decoded_beyond_its_size(tmp_path):
    Image.new("L", (300_000, 1), 200).save(tmp_path / "long.png")  # a few KB on disk
    # in a process of its own, whose peak memory says what decoding this image took
    code = f"""import resource, vae
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = vae.load_image({str(tmp_path / "long.png")!r}, 64, 3)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(tuple(x.shape), int(x.float().mean()), grown // 1024)"""
    env = dict(os.environ, PYTHONPATH=HERE)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("(3, 64, 64) 200 "), r.stderr
    assert int(r.stdout.split()[-1]) < 200  # MB: resizing the long side first would take GB


# ----------------------------------------------------------------------------
# The tool: the command line


@pytest.mark.parametrize(
    "argv, sentence",
    [
        (["--epochs", "-1"], "argument --epochs: expected an integer from 0 to 100000, got '-1'"),
        (["--epochs", "1e9"], "argument --epochs: expected an integer from 0 to 100000"),
        (["--seed", "1e20"], "argument --seed: expected an integer from 0 to 4294967295"),
        (["--free_bits", "inf"], "argument --free_bits: expected a number from 0.0 to 100.0"),
        (["--lr", "nan"], "argument --lr: expected a number from 1e-08 to 10.0"),
        (["--latent_dim", "0"], "argument --latent_dim: expected an integer from 1 to 4096"),
        (["--image_size", "30"], "invalid choice: 30 (choose from 28, 32, 64, 128)"),
        (["--epochs", "0"], "--epochs 0 trains nothing; to evaluate a saved model, give"),
        (["--resume", "--overwrite"], "--resume continues the run in --out_dir: it goes with"),
        (["--epoch", "40"], "unrecognized arguments: --epoch 40"),  # no abbreviations
        (["--dataset", "folder"], "--dataset folder needs --data_dir"),
        (["--iwae_samples", "5", "--beta", "0.5"], "--iwae_samples trains the IWAE bound, which"),
        (["--iwae_samples", "5", "--kl_warmup", "2"], "has no --beta, --free_bits or --kl_warmup"),
        (["--lr_schedule", "step"], "argument --lr_schedule: invalid choice: 'step'"),
    ],
)
def test_the_parser_refuses_bad_input_with_a_sentence(argv, sentence, capsys):
    with pytest.raises(SystemExit) as e:
        vae.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and sentence in err and "Traceback" not in err


def test_defaults_follow_the_dataset_and_model_and_help_shows_ranges():
    assert vae.parse_args([]).data_dir == "./mnist" and vae.parse_args([]).out_dir == "runs/conv"
    assert vae.parse_args(["--dataset", "kmnist"]).data_dir == "./data"
    assert vae.parse_args(["--model", "mlp"]).out_dir == os.path.join("runs", "mlp")
    text = " ".join(vae.build_parser().format_help().split())  # argparse wraps anywhere
    assert "--latent_dim LATENT_DIM 1 to 4096 (default: 32)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_importing_vae_has_no_side_effects(tmp_path):
    # nor loads what only the tool needs, which would double the time `import vae` takes
    code = "import sys, vae; assert not {'torchvision', 'matplotlib', 'PIL'} & set(sys.modules)"
    env = dict(os.environ, PYTHONPATH=HERE)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True)
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_gpu_gets_one_sentence():
    with pytest.raises(vae.UserError, match="--device cuda was asked for but is not available"):
        vae.select_device("cuda")


# ----------------------------------------------------------------------------
# The tool: runs end to end, their folders and figures


def test_one_run_end_to_end(mnist_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--data_dir", mnist_dir, "--out_dir", out, *"--epochs 2 --latent_dim 8".split()]
    history = vae.main([*map(str, argv), "--batch_size", "64", "--device", "cpu"])
    written = sorted(f for f in os.listdir(out) if not f.startswith("."))  # .lock: the run's lock
    expected = "best_worst class_means interpolation latent_distribution latent_pca loss_curves "
    expected += (
        "recon_error_hist reconstructions_epoch001 reconstructions_epoch002 samples traversals"
    )
    files = "checkpoint.pt config.json evaluation.json metrics.csv per_class.csv".split()
    assert written == sorted([f"{name}.png" for name in expected.split()] + files)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(r.pop("objective") == "elbo" for r in rows)  # train_loss: recon + beta * kl
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    for r in rows:
        elbo = float(r["test_recon"]) + float(r["test_kl"])
        assert float(r["test_neg_elbo"]) == pytest.approx(elbo, rel=1e-5)
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert history[-1]["test_neg_elbo"] == float(rows[-1]["test_neg_elbo"])
    # the final report evaluates the same weights with the same generator: the same numbers
    results = json.loads((out / "evaluation.json").read_text())
    for key in ("test_neg_elbo", "test_recon", "test_kl"):
        assert results[key] == float(rows[-1][key]), key
    assert results["likelihood"] == "bernoulli" and "sigma" not in results
    config = json.loads((out / "config.json").read_text())
    assert config["latent_dim"] == 8 and config["model"] == "conv" and config["channels"] == 1
    loaded, state = vae.load_checkpoint(out / "checkpoint.pt")
    assert state["config"] == config and state["epoch"] == 2 and not loaded.training
    assert set(state) >= {"model", "optimizer", "history", "rng"}


def test_the_users_command_in_a_clone_leaves_git_status_empty(tmp_path):
    if not os.path.isdir(os.path.join(HERE, ".git")):
        pytest.skip("needs the git repository of vae.py")
    clone = tmp_path / "clone"

    def git(*a):
        return subprocess.run(
            ["git", *a], cwd=clone, capture_output=True, text=True, check=True
        ).stdout

    clone.mkdir()
    tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout
    for name in tracked.splitlines():  # the working tree's tracked files, as a clone holds them
        if os.path.exists(os.path.join(HERE, name)):
            os.makedirs(os.path.dirname(clone / name), exist_ok=True)
            shutil.copy(os.path.join(HERE, name), clone / name)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    write_small_mnist(clone / "mnist", n_train=64, n_test=32)
    rc, out, err = cli(["--data_dir", "./mnist", "--epochs", "30", "--beta", "0.5"], cwd=clone)
    assert rc == 0, err
    assert (clone / "runs" / "conv" / "reconstructions_epoch030.png").exists()
    assert git("status", "--porcelain") == ""


def test_a_run_folder_is_never_replaced_silently_nor_written_by_two_runs(
    mnist_dir, tmp_path, capsys
):
    (tmp_path / "samples.png").write_bytes(b"a figure of an evaluation")
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs", 1), capsys)
    assert one_sentence(code, err) and "already holds the files of another run (samples.png)" in err
    (tmp_path / "notes.txt").write_text("the user's own file")
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 2, "--latent_dim", 2, "--overwrite"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs", 1), capsys)
    assert one_sentence(code, err) and "--resume" in err and "--overwrite" in err
    for extra, sentence in (
        (["--resume", "--epochs", 2], "has finished epoch 2 of 2"),
        (["--resume", "--out_dir", tmp_path / "none"], "found no checkpoint.pt"),
    ):
        code, _, err = run_main(quick_run(mnist_dir, tmp_path) + extra, capsys)
        assert one_sentence(code, err) and sentence in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert (tmp_path / "manifold.png").exists()  # latent_dim 2
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 1, "--overwrite"))
    left = set(os.listdir(tmp_path))
    assert "manifold.png" not in left and "reconstructions_epoch002.png" not in left
    assert "notes.txt" in left and "reconstructions_epoch001.png" in left
    lock = vae.prepare_output_dir(str(tmp_path), resume=True)  # as a run writing there holds it
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs", 1, "--overwrite"), capsys)
    assert one_sentence(code, err) and f"another run is writing into '{tmp_path}' now" in err
    lock.close()  # as the run's end, or its crash, releases it
    code, _, err = run_main(
        quick_run(mnist_dir, tmp_path / "notes.txt" / "run", "--epochs", 1), capsys
    )
    assert one_sentence(code, err) and "cannot create --out_dir" in err  # a file is in the way


def test_the_loss_curves_show_the_elbo_and_name_the_beta_of_every_epoch(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    rows = [
        dict(
            epoch=e,
            beta=b,
            train_loss=1 + 2 * b,
            train_recon=1.0,
            train_kl=2.0,
            test_neg_elbo=3.5,
            test_recon=1.5,
            test_kl=2.0,
        )
        for e, b in ((1, 0.0), (2, 0.25), (3, 0.5), (4, 0.5))
    ]
    vae.plot_losses(rows, tmp_path / "warmup.png")
    vae.plot_losses([dict(r, beta=1.0) for r in rows], tmp_path / "elbo.png")
    trained = "-ELBO = recon + KL\n(the run minimised recon + beta * KL, beta from 0 to 0.5)"
    assert figures[0].axes[0].get_title() == trained
    assert figures[1].axes[0].get_title() == "-ELBO = recon + KL"
    train, test = (line.get_ydata().tolist() for line in figures[0].axes[0].get_lines())
    assert train == [3.0] * 4 and test == [3.5] * 4  # the -ELBO, not the beta-weighted loss
    resumed = [dict(r, beta=1.0, objective="elbo" if r["epoch"] < 3 else "iwae5") for r in rows]
    vae.plot_losses(resumed, tmp_path / "iwae.png")
    trained = "-ELBO = recon + KL\n(trained on the ELBO,\nthen from epoch 3 on the IWAE5 bound)"
    assert figures[2].axes[0].get_title() == trained


def test_the_log_says_when_a_bernoulli_number_is_not_a_probability(mnist_dir, tmp_path, capsys):
    vae.main(quick_run(mnist_dir, tmp_path / "grey", "--epochs", 1, "--nll_samples", 2))
    grey = capsys.readouterr().out.splitlines()
    vae.main(quick_run(mnist_dir, tmp_path / "binary", "--epochs", 1, "--binarize"))
    binary = capsys.readouterr().out
    note = "Bernoulli on pixels that are not binary: not a probability"
    assert note in next(line for line in grey if line.startswith("test -ELBO"))
    assert note in next(line for line in grey if line.startswith("test NLL"))
    assert "test -ELBO" in binary and note not in binary


def degenerate_case(case):
    """(model, test images uint8 (N, 1, 28, 28), labels (N,), class names) whose statistics are
    degenerate in the way `case` names."""
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=1 if case == "latent_dim 1" else 3, hidden=(16,))
    images, labels = fake_digits(12, seed=4)
    images, labels = images[:, None], labels.long()
    classes = [str(c) for c in range(10)]
    if case == "all-equal images":
        images = torch.full_like(images, 128)
    elif case == "one image":
        images, labels = images[:1], labels[:1]
    elif case == "one class":
        labels, classes = torch.zeros_like(labels), ["only"]
    elif case == "values near 1e30":
        with torch.no_grad():
            model.decoder[-2].bias.fill_(1e30)  # logits of 1e30: errors near 1e30 nats a pixel
            model.fc_mu.bias.fill_(1e15)  # mu^2 near 1e30
    return model, images, labels, classes


@pytest.mark.parametrize(
    "case", ["all-equal images", "one image", "one class", "values near 1e30", "latent_dim 1"]
)
def test_the_final_report_survives_degenerate_statistics(tmp_path, case):
    model, images, labels, classes = degenerate_case(case)
    config = vars(vae.parse_args([]))
    results = vae.report(model, images, labels, config, tmp_path, nll_samples=2, classes=classes)
    named = "evaluation.json samples.png interpolation.png latent_distribution.png traversals.png "
    named += "class_means.png latent_pca.png recon_error_hist.png best_worst.png per_class.csv"
    assert sorted(os.listdir(tmp_path)) == sorted(named.split())
    assert math.isfinite(results["test_neg_elbo"]) and len(results["per_class"]) >= 1


@pytest.mark.parametrize("writer", ["save_figure", "save_grid"])
def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch, writer):
    import matplotlib.figure
    import torchvision.utils

    path = tmp_path / "figure.png"
    path.write_bytes(b"the previous figure")

    def half_then_fail(*args, **kwargs):
        args[1].write(b"\x89PNG half")  # the open file: Figure.savefig(self, f), save_image(x, f)
        raise OSError(28, "No space left on device")

    if writer == "save_figure":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
        call = functools.partial(vae.save_figure, vae._figure(2, 2), path)
    else:
        monkeypatch.setattr(torchvision.utils, "save_image", half_then_fail)
        call = functools.partial(vae.save_grid, torch.rand(4, 1, 8, 8), path, nrow=2)
    with pytest.raises(vae.UserError, match="No space left on device"):
        call()
    assert path.read_bytes() == b"the previous figure" and os.listdir(tmp_path) == ["figure.png"]


def test_class_names_that_matplotlib_would_read_as_mathematics(tmp_path, monkeypatch):
    names = ("$x$", "a$b", "$x^$", "$\\notacommand$", "50% off_{1}", os.fsdecode(b"caf\xe9"))
    data = write_image_folder(tmp_path / "images" / "train", classes=names, per_class=3).parent
    write_image_folder(data / "val", classes=names, per_class=1, seed=1)
    figures = capture_figures(monkeypatch)
    vae.main(folder_run(data, tmp_path / "out", "--epochs", "1"))
    with open(tmp_path / "out" / "per_class.csv", errors="surrogateescape") as f:
        assert [row["name"] for row in csv.DictReader(f)] == sorted(names)  # bytes and all
    shown = []
    for ax in (ax for fig in figures for ax in fig.axes):
        legend = ax.get_legend().texts if ax.get_legend() else []
        shown += [t.get_text() for t in ax.get_yticklabels() + ax.texts + legend]
    drawn = [os.fsencode(name).decode("utf-8", "replace").replace("$", r"\$") for name in names]
    assert all(name in shown for name in drawn)  # as text: $ escaped, bad bytes as U+FFFD


def test_conditional_run_writes_a_grid_per_class_and_its_checkpoint_evaluates(mnist_dir, tmp_path):
    out = tmp_path / "cvae"
    vae.main(quick_run(mnist_dir, out, "--epochs", 1, "--conditional", "--nll_samples", 4))
    written = set(os.listdir(out))
    assert "samples_per_class.png" in written and "samples.png" not in written
    model, state = vae.load_checkpoint(out / "checkpoint.pt")
    assert model.num_classes == 10 and len(state["config"]["classes"]) == 10
    argv = ["--checkpoint", out / "checkpoint.pt", "--out_dir", tmp_path / "eval"]
    results = vae.main([*map(str, argv), "--nll_samples", "4"])  # data: the run's own
    assert (
        math.isfinite(results["test_nll"])
        and (tmp_path / "eval" / "samples_per_class.png").exists()
    )


def test_conditional_class_counts_that_differ_from_the_checkpoints(tmp_path, capsys):
    three = write_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=4)
    two = write_image_folder(tmp_path / "two", classes=("a", "b"), per_class=4)
    vae.main(folder_run(three, tmp_path / "run", "--epochs", "1", "--conditional"))
    for argv in (
        ["--resume", "--out_dir", tmp_path / "run", "--epochs", 2, "--data_dir", two],
        ["--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data_dir", two],
    ):
        code, _, err = run_main(argv, capsys)
        assert one_sentence(code, err) and "is conditional on 3 classes, and the data in" in err
        assert "has 2" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_leaves_the_model_untouched_and_trains_like_eager(mnist_dir):
    device = torch.device("cuda")
    images = fake_digits(250, seed=6)[0][:, None].to(device)  # 3 full batches of 64 and one of 58
    losses = {}
    for use_graph in (False, True):
        torch.manual_seed(0)
        model = vae.ConvVAE(latent_dim=8).to(device)
        lr = torch.tensor(1e-3, device=device)  # as the tool makes it: a graph reads a tensor
        optimizer = torch.optim.Adam(model.parameters(), lr, fused=True, capturable=True)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        step = vae.train_step
        if use_graph:
            step = vae.CUDAGraphStep(model, optimizer, vae.to_float(images[:64]))
        for k, v in model.state_dict().items():  # the capture's warm-up steps were undone
            assert torch.equal(v, start[k]), k
        history = []
        for epoch in range(1, 6):
            vae.set_lr(optimizer, vae.lr_schedule(epoch, 1e-3, 5, "cosine"))
            history.append(vae.train_epoch(model, optimizer, images, 64, step=step)["loss"])
        assert history[-1] < history[0]
        losses[use_graph] = history[-1]
        vae.set_lr(optimizer, 0.0)  # a replay reads the new rate: no step moves a weight
        weights = [p.clone() for p in model.parameters()]
        step(model, optimizer, vae.to_float(images[:64]))
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert losses[True] == pytest.approx(losses[False], rel=0.05)  # only the draws of eps differ


def test_two_processes_train_together_and_write_one_set_of_outputs(mnist_dir, tmp_path):
    rc, out, err = torchrun(2, quick_run(mnist_dir, tmp_path / "run", "--epochs", 3), cwd=tmp_path)
    assert rc == 0, out + err  # rank 0's log says how far the run got
    assert "device cpu x 2 processes" in out
    epochs = [
        line.split("|")[0].split()[1] for line in out.splitlines() if line.startswith("epoch")
    ]
    assert epochs == ["1/3", "2/3", "3/3"]  # rank 0 prints, once
    assert sorted(os.listdir(tmp_path)) == ["run"]
    losses = [float(r["train_loss"]) for r in metrics(tmp_path / "run" / "metrics.csv")]
    assert losses[2] < losses[1] < losses[0]
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".tmp-")]
    model, state = vae.load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # as a single process
    assert state["config"]["epochs"] == 3 and model.latent_dim == 4


THREADS_AFTER_THE_GROUP = f"""
import os, sys, torch
sys.path.insert(0, {HERE!r})
import vae
with vae.process_group(torch.device("cpu")):
    torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
print(sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_leaving_the_process_group_ends_its_gloo_threads(tmp_path):
    # left to interpreter exit, they can abort a process that did all its work
    script = tmp_path / "group.py"
    script.write_text(THREADS_AFTER_THE_GROUP)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    r = subprocess.run([*run, script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("['"), r.stderr
    assert "gloo" not in r.stdout


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_one_process_under_torchrun_is_the_plain_run(mnist_dir, tmp_path, device):
    argv = quick_run(mnist_dir, tmp_path / "ddp", "--epochs", 2, "--device", device)
    rc, _, err = torchrun(1, argv, cwd=tmp_path)
    assert rc == 0, err
    vae.main(quick_run(mnist_dir, tmp_path / "plain", "--epochs", 2, "--device", device))
    ddp, plain = (metrics(tmp_path / d / "metrics.csv") for d in ("ddp", "plain"))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt")["model"] for d in ("ddp", "plain"))
    if device == "cpu":  # the same arithmetic in the same order: the same bits
        assert ddp == plain and all(torch.equal(a[k], b[k]) for k in a)
    else:  # the plain run replays a CUDA graph, DDP steps eagerly: rounded differently
        for row_a, row_b in zip(ddp, plain):
            elbo = float(row_b["test_neg_elbo"])
            assert float(row_a["test_neg_elbo"]) == pytest.approx(elbo, rel=0.02)


def test_torchrun_needs_a_batch_that_the_processes_can_share(mnist_dir, tmp_path):
    argv = quick_run(mnist_dir, tmp_path / "run", "--epochs", 1, "--batch_size", 63)
    rc, out, err = torchrun(2, argv, cwd=tmp_path)
    assert rc != 0 and "--batch_size 63 is the batch of all 2 processes together" in err
    assert err.count("vae.py: error:") == 1  # said by rank 0 only
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# The tool: checkpoints, and evaluating a saved model


def test_evaluate_nll_is_repeatable_and_reports_nats_and_bits_per_dim():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=4)
    images = (fake_digits(30, seed=9)[0][:, None] > 127).to(torch.uint8) * 255
    nll, bpd = vae.evaluate_nll(model, images, k=5)
    assert nll > 0 and bpd == pytest.approx(nll / (784 * math.log(2)))
    assert vae.evaluate_nll(model, images, k=5) == (nll, bpd)  # its own generator, seeded
    assert vae.evaluate_nll(model, images, k=5, seed=1)[0] != nll
    assert model.training  # restored


@pytest.fixture(scope="module")
def good_checkpoint(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    vae.main(quick_run(mnist_dir, out, "--epochs", 1))
    return out / "checkpoint.pt"


def test_checkpoint_mode_reproduces_the_run_without_touching_it(mnist_dir, tmp_path):
    run = tmp_path / "run"
    extra = "--model conv --width 32 --epochs 2 --latent_dim 2 --binarize --nll_samples 20 --kl_warmup 1"
    extra = extra.split()  # conv: the run trains and evaluates in NHWC, and so must this mode
    history = vae.main(quick_run(mnist_dir, run, *extra))
    assert [row["beta"] for row in history] == [0.0, 1.0]
    ckpt = run / "checkpoint.pt"
    before = ckpt.read_bytes()
    trained = json.loads((run / "evaluation.json").read_text())
    assert trained["test_nll"] < trained["test_neg_elbo"] + 1.0  # K=20 is tighter than the ELBO
    assert trained["test_nll_bits_per_dim"] == pytest.approx(
        trained["test_nll"] / (784 * math.log(2))
    )
    assert len(trained["per_class"]) == 10
    again = tmp_path / "again"
    argv = ["--checkpoint", ckpt, "--data_dir", mnist_dir, "--out_dir", again, "--nll_samples", 20]
    results = vae.main([*map(str, argv), "--device", "cpu"])
    assert ckpt.read_bytes() == before and results["epoch"] == 2
    assert not (again / "checkpoint.pt").exists() and not (again / "metrics.csv").exists()
    assert (again / "manifold.png").exists() and (again / "traversals.png").exists()  # latent 2
    # the same binary test set, weights and seed: the same numbers and samples, bit for bit
    for key in ("test_neg_elbo", "test_recon", "test_kl", "test_loss", "test_nll"):
        assert results[key] == trained[key], key
    assert (again / "samples.png").read_bytes() == (run / "samples.png").read_bytes()
    assert (again / "reconstructions.png").exists() and (again / "loss_curves.png").exists()
    other = vae.main(
        ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "seed5"), "--seed", "5"]
    )
    assert other["test_kl"] == trained["test_kl"]  # closed form: no draw
    assert other["test_recon"] != trained["test_recon"]  # z drawn with seed 5
    assert (tmp_path / "seed5" / "samples.png").read_bytes() != (run / "samples.png").read_bytes()


def test_checkpoint_mode_writes_beside_the_checkpoint_and_names_what_it_ignores(
    mnist_dir, tmp_path, capsys
):
    vae.main(quick_run(mnist_dir, tmp_path / "run", "--epochs", 1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    code, out, _ = run_main(
        ["--checkpoint", ckpt, *"--epochs 5 --lr 0.1 --interpolate 42 43".split()], capsys
    )
    assert code == 0 and "so it ignores --epochs, --lr\n" in out  # --interpolate is used:
    assert "--interpolate 42 43 does not name two classes that the test set has" in out
    assert (tmp_path / "run" / "eval" / "evaluation.json").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    code, _, err = run_main(
        ["--checkpoint", ckpt], capsys
    )  # its own folder now holds an evaluation
    assert one_sentence(code, err) and "already holds the files of another run" in err
    vae.main(quick_run(mnist_dir, tmp_path / "b", "--epochs", 1, "--seed", 1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    for extra in ([], ["--overwrite"]):  # a training run's folder: never, not even with --overwrite
        code, _, err = run_main(["--checkpoint", ckpt, "--out_dir", tmp_path / "b", *extra], capsys)
        assert one_sentence(code, err) and "holds a training run" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before


def test_a_model_saved_from_python_is_evaluated_with_the_settings_its_note_names(
    mnist_dir, tmp_path, capsys
):
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=2, hidden=(32,))
    vae.save_model(tmp_path / "mine.pt", model)
    argv = ["--checkpoint", tmp_path / "mine.pt", "--data_dir", mnist_dir, "--nll_samples", 3]
    extra = "--likelihood gaussian --sigma 0.5 --beta 2 --epochs 3".split()
    code, out, _ = run_main(argv + extra, capsys)
    assert code == 0 and "so it ignores --epochs\n" in out  # and nothing it then uses
    assert (
        "holds a model without a training run's settings, so it is evaluated with --dataset "
        "mnist, no --binarize, --likelihood gaussian, --sigma 0.5, --beta 2.0" in out
    )
    results = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert (results["likelihood"], results["sigma"], results["beta"]) == ("gaussian", 0.5, 2.0)
    assert results["test_loss"] == pytest.approx(results["test_recon"] + 2 * results["test_kl"])
    test_x = vae.load_dataset("mnist", mnist_dir)["test_x"]
    assert results["test_nll"] == vae.evaluate_nll(model, test_x, 3, None, "gaussian", 0.5)[0]
    assert results["epoch"] is None and (tmp_path / "eval" / "manifold.png").exists()


def test_a_resumed_gaussian_run_reports_its_nll_under_the_gaussian(mnist_dir, tmp_path):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 1, "--likelihood", "gaussian"))
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 2, "--resume", "--nll_samples", 4))
    results = json.loads((tmp_path / "evaluation.json").read_text())
    model, _ = vae.load_checkpoint(tmp_path / "checkpoint.pt")
    test_x = vae.load_dataset("mnist", mnist_dir)["test_x"]
    assert results["likelihood"] == "gaussian" and results["sigma"] == 0.1
    assert results["test_nll"] == vae.evaluate_nll(model, test_x, 4, None, "gaussian", 0.1)[0]


def edit_run_field(state, what):
    """Edit one field of a run's checkpoint (`state`, its dict) the way `what` says."""
    if what == "no history":
        del state["history"]
    elif what == "epoch as text":
        state["epoch"] = "1"
    elif what == "latent_dim as text":
        state["config"]["latent_dim"] = "4"
    elif what == "no image size":
        del state["config"]["image_size"]
    elif what == "random state":
        state["rng"]["cpu"] = [1, 2, 3]
    elif what == "optimizer shapes":
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"] = first["exp_avg"][:1]


def edit_checkpoint(state, what):
    """The bytes of a good checkpoint (`state`, its dict) damaged the way `what` says."""
    if what == "random bytes":
        return random.Random(0).randbytes(5000)
    if what == "text":
        return b"this is a text file, not a checkpoint\n"
    if what == "pickle with code":
        state["payload"] = os.getcwd
    elif what == "tensors only":
        state = {"weights": torch.zeros(3)}
    elif what == "incompatible model":
        state["model_args"]["latent_dim"] = 7
    edit_run_field(state, what)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()[:2000] if what == "truncated" else buffer.getvalue()


@pytest.mark.parametrize(
    "what, sentence",
    [
        ("random bytes", "is not a checkpoint written by vae.py"),
        ("text", "is not a checkpoint written by vae.py"),
        ("truncated", "is not a checkpoint written by vae.py"),
        ("pickle with code", "was refused: it holds Python objects beyond tensors and plain data"),
        ("tensors only", "cannot be loaded as a model of vae.py: it names no model class"),
        ("incompatible model", "weights do not fit the MLPVAE({'image_size': 28"),
        ("no history", "is not a whole checkpoint of a vae.py run: its history is missing"),
        ("epoch as text", "its epoch is missing or not what vae.py writes"),
        ("latent_dim as text", "its latent_dim is missing or not what vae.py writes"),
        ("no image size", "its image size is missing or not what vae.py writes"),
        ("random state", "its random state is missing or not what vae.py writes"),
        ("optimizer shapes", "its optimizer is missing or not what vae.py writes"),
    ],
)
def test_a_bad_or_edited_checkpoint_gets_one_sentence(
    tmp_path, good_checkpoint, capsys, what, sentence
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(edit_checkpoint(torch.load(good_checkpoint), what))
    for argv in (
        ["--checkpoint", run / "checkpoint.pt", "--out_dir", tmp_path / "o"],
        ["--resume", "--out_dir", run, "--epochs", 5],
    ):
        code, _, err = run_main(argv, capsys)
        assert one_sentence(code, err) and sentence in err, err
    assert not (tmp_path / "o").exists() and os.listdir(run) == ["checkpoint.pt"]
    code, _, err = run_main(["--checkpoint", tmp_path / "none.pt"], capsys)
    assert one_sentence(code, err) and "there is no checkpoint at" in err


# ----------------------------------------------------------------------------
# The tool: never lose a run (resume, safe writes, signals, divergence)


def test_resume_continues_bit_for_bit_and_seeded_runs_repeat(mnist_dir, tmp_path):
    # each uses the random generators or the epoch
    extra = ("--binarize", "--kl_warmup", 2, "--lr_schedule", "cosine", "--lr", 0.002)
    vae.main(quick_run(mnist_dir, tmp_path / "a", "--epochs", 3, *extra))
    vae.main(quick_run(mnist_dir, tmp_path / "b", "--epochs", 3, *extra))
    vae.main(quick_run(mnist_dir, tmp_path / "c", "--epochs", 1, *extra))
    vae.main(quick_run(mnist_dir, tmp_path / "c", "--epochs", 3, "--resume"))
    a = metrics(tmp_path / "a" / "metrics.csv")
    assert len(a) == 3 and [float(r["beta"]) for r in a] == [0.0, 0.5, 1.0]
    assert [float(r["lr"]) for r in a] == pytest.approx([0.002, 0.0015, 0.0005])
    assert metrics(tmp_path / "b" / "metrics.csv") == a  # the same seed, the same numbers
    assert metrics(tmp_path / "c" / "metrics.csv") == a  # stopped after 1, resumed to 3
    weights = [torch.load(tmp_path / d / "checkpoint.pt")["model"] for d in "ac"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_iwae_run_names_the_bound_it_trains_and_an_elbo_run_may_resume_under_it(
    mnist_dir, tmp_path, capsys
):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 1))
    code, out, _ = run_main(
        quick_run(mnist_dir, tmp_path, "--epochs", 2, "--resume", "--iwae_samples", 3), capsys
    )
    rows = metrics(tmp_path / "metrics.csv")
    assert code == 0 and "the saved settings but --epochs 2, --iwae_samples 3\n" in out
    assert "| train -IWAE3 " in out and [r["objective"] for r in rows] == ["elbo", "iwae3"]
    assert math.isfinite(float(rows[1]["train_loss"])) and rows[1]["beta"] == "1.0"
    vae.main(quick_run(mnist_dir, tmp_path / "b", "--epochs", 1, "--beta", 0.5))
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    code, _, err = run_main(
        quick_run(mnist_dir, tmp_path / "b", "--epochs", 2, "--resume", "--iwae_samples", 2), capsys
    )
    assert one_sentence(code, err) and "which the IWAE bound has not; resume it without" in err
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before


def test_resume_accepts_a_checkpoint_older_than_some_flags_and_a_moved_data_folder(
    mnist_dir, tmp_path
):
    vae.main(quick_run(mnist_dir, tmp_path / "run", "--epochs", 1))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt)
    for key in ("kl_warmup", "free_bits", "binarize", "grad_clip", "nll_samples"):  # as before
        del state["config"][key]
    state["config"]["data_dir"] = str(tmp_path / "moved-away")
    torch.save(state, ckpt)
    argv = [
        "--resume",
        "--out_dir",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--data_dir",
        mnist_dir,
    ]
    assert [row["epoch"] for row in vae.main(argv)] == [1, 2]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_dir"] == mnist_dir and config["free_bits"] == 0.0 and config["epochs"] == 2


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(mnist_dir, tmp_path, capsys):
    rng = random.Random(0)
    ckpt = tmp_path / "checkpoint.pt"
    for _ in range(4):
        argv = quick_run(
            mnist_dir, tmp_path, "--epochs", 100000, *(["--resume"] if ckpt.exists() else [])
        )
        vae_py = [sys.executable, os.path.join(HERE, "vae.py")]
        proc = subprocess.Popen(
            [*vae_py, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(ckpt, proc)
        time.sleep(rng.uniform(0.5, 2.5))  # a random moment among the saves that follow
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        vae.load_checkpoint(ckpt)  # whole, whenever the kill came
    saved = torch.load(ckpt)["epoch"]
    (tmp_path / ".tmp-abcdcheckpoint.pt").write_bytes(b"half")  # as a kill during a save leaves it
    assert saved >= 2  # the kills did interrupt a run that was making progress
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", saved + 2, "--resume"))
    epochs = [int(r["epoch"]) for r in metrics(tmp_path / "metrics.csv")]
    assert epochs == list(range(1, saved + 3))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # cleaned up


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_with_the_last_epoch_saved(mnist_dir, tmp_path, sig, code):
    argv = [
        sys.executable,
        os.path.join(HERE, "vae.py"),
        *quick_run(mnist_dir, tmp_path, "--epochs", 500),
    ]
    # A shell starts background jobs with SIGINT ignored, and a child inherits that: the run gets
    # the default disposition back, as in a terminal, whatever started this test.
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for(tmp_path / "checkpoint.pt", proc, seconds=60)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume" in err
    assert "Traceback" not in err
    state = torch.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] >= 1 and len(state["history"]) == state["epoch"]


def test_advice_only_when_following_it_works(mnist_dir, tmp_path, monkeypatch, capsys):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 1))

    def ctrl_c(model):
        raise KeyboardInterrupt

    patch_step(monkeypatch, 2, ctrl_c)  # in the new run's first epoch
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs", 1, "--overwrite"), capsys)
    assert (
        one_sentence(code, err, 130)
        and "stopped by SIGINT in epoch 1; no epoch had finished" in err
    )
    assert "--resume" not in err and not (tmp_path / "checkpoint.pt").exists()  # the old run's gone


@pytest.mark.parametrize("step, where", [(2, "at epoch 2, step 3 "), (5, "after epoch 2")])
def test_a_non_finite_number_stops_at_once_and_keeps_the_last_good_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys, step, where
):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 1))  # 5 steps of 64 images per epoch
    before = (tmp_path / "checkpoint.pt").read_bytes()
    patch_step(
        monkeypatch, step, blow_up
    )  # 5: the last step of epoch 2, whose own numbers are fine
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs", 3, "--resume"), capsys)
    assert one_sentence(code, err, 3) and f"became non-finite {where}" in err
    assert "--lr" in err and "--grad_clip" in err and "checkpoint of epoch 1" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [int(r["epoch"]) for r in metrics(tmp_path / "metrics.csv")] == [1]  # no NaN row


def test_a_finite_divergence_is_named_in_one_line(mnist_dir, tmp_path, monkeypatch, capsys):
    def logits_of_1e4(model):
        with torch.no_grad():
            model.decoder[-2].bias.fill_(1e4)

    patch_step(monkeypatch, 10, logits_of_1e4)  # the last step of epoch 2
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs", 2))
    lines = capsys.readouterr().out.splitlines()
    warnings = [i for i, line in enumerate(lines) if line.startswith("warning: training has")]
    assert len(warnings) == 1 and lines[warnings[0] - 1].startswith("epoch   2/2")
    said = "a decoder that says 0.5 for every pixel; try a lower --lr (now 0.002)"
    assert said in lines[warnings[0]]


def test_the_warnings_say_what_they_saw():
    cost = 64 * 64 * 3 * math.log(2)  # a decoder saying 0.5, on the Flowers' pixels
    assert vae.divergence_warning(1.4e13, 6700.0, cost, 10.0).startswith("warning: training")
    assert "ten times or more the 100 nats" in vae.divergence_warning(2000.0, 100.0, cost, 1e-3)
    assert vae.divergence_warning(6713.7, 6690.2, cost, 1e-3) is None  # a creeping test loss
    assert vae.divergence_warning(-500.0, -550.0, 8700.0, 1e-3) is None  # Gaussian: negative
    images = fake_digits(8, seed=1)[0][:, None]
    assert vae.constant_decoder_cost(images) == pytest.approx(784 * math.log(2))  # P ln 2
    gaussian = vae.constant_decoder_cost(images, "gaussian", 0.1)
    expected = -Normal(0.5, 0.1).log_prob(vae.to_float(images)).flatten(1).sum(1).mean()
    assert gaussian == pytest.approx(expected.item(), rel=1e-5)
    assert vae.collapse_warning(kl=5.0, active_units=3, n_images=100) is None
    for kl, au, start in ((0.05, 3, "posterior collapse"), (5.0, 0, "no active latent unit")):
        text = vae.collapse_warning(kl, au, n_images=100)
        assert text.startswith(f"warning: {start}") and "--kl_warmup" in text, text
    assert "is the prior" not in vae.collapse_warning(5.0, 0, n_images=100)  # the KL says it isn't
    # a handful of test images has no variance to speak of: only the KL can tell
    assert vae.collapse_warning(kl=5.0, active_units=0, n_images=1) is None


def test_out_of_gpu_memory_is_one_sentence_and_keeps_the_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    # Whatever runs out of GPU memory (the images, the model, a batch) raises OutOfMemoryError;
    # here after the first step of epoch 2, as a too large --batch_size would on a GPU.
    def out_of_memory(model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    patch_step(monkeypatch, 6, out_of_memory)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs", 2), capsys)
    assert (
        one_sentence(code, err) and "the GPU ran out of memory; use a smaller --batch_size" in err
    )
    assert vae.load_checkpoint(tmp_path / "checkpoint.pt")[1]["epoch"] == 1  # the good epoch


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB file system of its own (tmpfs), mounted for the test: a disk that can fill up."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # also when a file is left open


def test_a_full_disk_gets_one_sentence_and_keeps_the_previous_checkpoint(
    small_disk, mnist_dir, capsys
):
    run = small_disk / "run"
    vae.main(quick_run(mnist_dir, run, "--epochs", 1))
    before = (run / "checkpoint.pt").read_bytes()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 200_000))  # room for less than a checkpoint
    code, _, err = run_main(quick_run(mnist_dir, run, "--epochs", 2, "--resume"), capsys)
    assert one_sentence(code, err, 1) and "No space left on device" in err
    assert "previous version, if any, is intact" in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
