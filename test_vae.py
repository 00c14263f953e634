"""Tests for vae.py, in two parts like the file. First the specification of the VAE (Part 1):
shapes, the KL and the likelihoods against torch.distributions, gradients, the exact log p(x) of
a linear-Gaussian model, a learning test, the importance-weighted bound, and Part 1 copied alone.
Then the tool (Part 2), on small data the tests write themselves: one run per kind of data,
resume, checkpoint mode, two processes under torchrun (gloo), and the table of bad inputs. CPU
only where no GPU is present; run with `python -m pytest -q -n 2`."""

import contextlib
import csv
import functools
import json
import math
import os
import pickle
import random
import re
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
# keeps the workers from spinning against each other.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


# ----------------------------------------------------------------------------
# Helpers: small data in MNIST's original format, and the command line


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


def images_of(n, seed):
    """n fake digits as (n, 1, 28, 28) uint8."""
    return fake_digits(n, seed)[0][:, None]


# ----------------------------------------------------------------------------
# The specification (Part 1): the models


@pytest.mark.parametrize(
    "model",
    [
        vae.ConvVAE(image_size=28, channels=1, latent_dim=8),
        vae.ConvVAE(image_size=32, channels=3, latent_dim=8, res_blocks=2),
        vae.MLPVAE(image_size=64, channels=3, latent_dim=8),
    ],
)
def test_shapes_ranges_and_logits(model):
    torch.manual_seed(0)
    c, s = model.channels, model.image_size
    x = torch.rand(3, c, s, s)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 8)
    assert model.reparameterize(mu, logvar).shape == (3, 8)
    x_hat = model.decode(mu)
    assert x_hat.shape == x.shape and x_hat.min() >= 0 and x_hat.max() <= 1
    torch.testing.assert_close(torch.sigmoid(model.decode_logits(mu)), x_hat)
    logits, mu2, logvar2 = model(x)  # what the loss takes: logits, any real number
    assert logits.shape == x.shape and mu2.shape == logvar2.shape == (3, 8)
    assert logits.min() < 0 < logits.max()
    samples = model.sample(5)
    assert samples.shape == (5, c, s, s) and not samples.requires_grad
    assert samples.min() >= 0 and samples.max() <= 1


def test_conv_depth_follows_image_size_and_refuses_other_sizes():
    assert vae.ConvVAE(image_size=28).feature_shape == (64, 7, 7)
    assert vae.ConvVAE(image_size=32).feature_shape == (128, 4, 4)
    assert vae.ConvVAE(image_size=64).feature_shape == (256, 4, 4)
    residual = vae.ConvVAE(res_blocks=2)
    blocks = [m for m in residual.modules() if isinstance(m, vae.ResidualBlock)]
    assert len(blocks) == 4 and all(b.f[0].in_channels == 64 for b in blocks)  # at 7 x 7, 2 a side
    x = torch.rand(3, 64, 7, 7)
    blocks[0].f[-1].weight.data.zero_()  # f(x) = BatchNorm's bias, 0: the block is LeakyReLU(x)
    torch.testing.assert_close(blocks[0](x), F.leaky_relu(x, 0.2))
    for size, res_blocks in ((30, 0), (12, 0), (28, -1)):
        with pytest.raises(ValueError, match="multiple of 4 and at least 16, and res_blocks >= 0"):
            vae.ConvVAE(image_size=size, res_blocks=res_blocks)


@pytest.mark.parametrize("training", [True, False])
def test_sampling_and_evaluation_leave_the_mode_and_every_buffer_as_they_found_them(training):
    torch.manual_seed(0)
    model = vae.ConvVAE(latent_dim=4).train(training)
    model(torch.rand(8, 1, 28, 28))  # moves BatchNorm's running statistics away from their start
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 28, 28)
    model.sample(16)
    vae.log_likelihood(model, x, k=3)
    vae.interpolate(model, x[0], x[1])
    vae.reconstruct(model, x)
    vae.evaluate(model, x)
    assert model.training == training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cls", [vae.ConvVAE, vae.MLPVAE])
def test_conditional_shapes_and_the_label_changes_the_image(cls):
    torch.manual_seed(0)
    model = cls(image_size=32, channels=3, latent_dim=6, num_classes=4).eval()
    x, y = torch.rand(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0])
    logits, mu, logvar = model(x, y)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (5, 6)
    assert model.fc_mu.in_features == model.encoder(x).shape[1] + 4
    assert model.sample(4, torch.arange(4)).shape == (4, 3, 32, 32)
    torch.testing.assert_close(model.encode(x, y.int())[0], model.encode(x, y)[0])
    with pytest.raises(ValueError, match="needs the class labels y"):
        model.encode(x)
    z = torch.randn(1, 6).repeat(4, 1)
    images = model.decode(z, torch.arange(4))  # one z, four labels
    assert all((images[i] - images[0]).abs().mean() > 1e-3 for i in range(1, 4))
    torch.testing.assert_close(model.decode(z, F.one_hot(torch.arange(4), 4).float()), images)
    assert (model.encode(x, (y + 1) % 4)[0] - model.encode(x, y)[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------
# The specification: the loss, checked against torch.distributions


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 10) * 2, torch.randn(16, 10)
    expected = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    zeros = torch.zeros(4, 6)  # 0 at the prior, positive elsewhere
    assert torch.equal(vae.kl_divergence(zeros, zeros), torch.zeros(4))
    assert (vae.kl_divergence(zeros + 0.5, zeros) > 0).all()
    assert (vae.kl_divergence(zeros, zeros - 1) > 0).all()


def test_bernoulli_reconstruction_is_the_bernoulli_log_likelihood_from_stable_logits():
    torch.manual_seed(0)
    logits, x = torch.randn(4, 1, 28, 28) * 3, torch.rand(4, 1, 28, 28)
    # Bernoulli.log_prob is -BCE for x in [0, 1] too; validation would insist on x in {0, 1}
    expected = -Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(vae.reconstruction_loss(logits, x), expected, rtol=1e-5, atol=1e-3)
    logits = torch.full((1, 1, 2, 2), 40.0)  # sigmoid rounds to exactly 1.0 in float32
    rec = vae.reconstruction_loss(logits, torch.zeros(1, 1, 2, 2))
    torch.testing.assert_close(rec, torch.tensor([160.0]))  # 4 pixels x 40 nats, unclipped
    with pytest.raises(ValueError, match="'bernoulli' or 'gaussian'"):
        vae.reconstruction_loss(logits, torch.zeros(1, 1, 2, 2), "bce")


@pytest.mark.parametrize("sigma", [1.0, 0.1, 0.02])
def test_gaussian_reconstruction_is_the_normal_density_with_its_constant(sigma):
    torch.manual_seed(0)
    logits, x = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    nll = -Normal(torch.sigmoid(logits), sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(vae.reconstruction_loss(logits, x, "gaussian", sigma), nll)


def test_every_part_one_function_refuses_float_images_outside_0_1_and_takes_uint8():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    optimizer = torch.optim.Adam(model.parameters())
    logits, mu, logvar = torch.zeros(2, 1, 28, 28), torch.zeros(2, 3), torch.zeros(2, 3)
    calls = [
        lambda x: vae.vae_loss(logits, x, mu, logvar),
        lambda x: vae.train_step(model, optimizer, x),
        lambda x: vae.evaluate(model, x),
        lambda x: vae.log_likelihood(model, x, 2),
        lambda x: vae.reconstruct(model, x),
        lambda x: vae.interpolate(model, x[0], x[1]),
    ]
    images = images_of(2, seed=3)
    for call in calls:
        for bad in (images.float(), images.float() / 255 - 0.5):  # 0-255 floats; below 0
            with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
                call(bad)
        call(images)  # uint8, and the same in [0, 1]: no error
        call(vae.to_float(images))
    assert (
        vae.vae_loss(logits, images, mu, logvar)[0]
        == vae.vae_loss(logits, vae.to_float(images), mu, logvar)[0]
    )


def test_loss_parts_add_up_and_beta_scales_only_the_kl():
    torch.manual_seed(0)
    logits, x = torch.randn(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    mu, logvar = torch.randn(8, 5), torch.randn(8, 5)
    _, rec1, kl1 = vae.vae_loss(logits, x, mu, logvar, beta=1.0)
    for beta in (0.0, 0.5, 4.0):
        loss, rec, kl = vae.vae_loss(logits, x, mu, logvar, beta=beta)
        torch.testing.assert_close(loss, rec + beta * kl)
        assert torch.equal(rec, rec1) and torch.equal(kl, kl1)
    # each part is a batch mean of the per-image values, in nats per image
    torch.testing.assert_close(rec1, vae.reconstruction_loss(logits, x).mean())
    torch.testing.assert_close(kl1, vae.kl_divergence(mu, logvar).mean())


def test_free_bits_change_the_gradient_only_under_the_floor():
    torch.manual_seed(0)
    logits, x = torch.randn(16, 1, 4, 4), torch.rand(16, 1, 4, 4)
    mu = torch.cat([torch.randn(16, 2) * 2, torch.randn(16, 2) * 0.05], dim=1)  # 2, 3 near 0
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
    assert (gm1[:, 2:] == 0).all() and (glv1[:, 2:] == 0).all() and (gm0[:, 2:] != 0).any()
    assert kl1 == kl0  # the reported KL is the true one
    assert loss1 == pytest.approx(loss0 + 2 * floor - kl_dims[2:].sum().item(), rel=1e-5)


def test_logvar_is_clamped_before_exp():
    model = vae.MLPVAE(latent_dim=3)
    with torch.no_grad():
        model.fc_logvar.bias.fill_(1000.0)  # exp(1000) is inf in float32
    x = torch.rand(2, 1, 28, 28)
    logits, mu, logvar = model(x)
    assert logvar.max().item() == vae.LOGVAR_RANGE[1]
    assert torch.isfinite(vae.vae_loss(logits, x, mu, logvar)[0])


# ----------------------------------------------------------------------------
# The specification: gradients and training


@pytest.mark.parametrize(
    "model", [vae.ConvVAE(latent_dim=8, res_blocks=1), vae.MLPVAE(latent_dim=8)]
)
def test_every_parameter_gets_a_finite_nonzero_gradient(model):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    logits, mu, logvar = model(x)
    vae.vae_loss(logits, x, mu, logvar)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_grad_clip_bounds_the_update_and_reports_the_norm():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3)
    stats = vae.train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), torch.rand(8, 1, 28, 28), grad_clip=1e-3
    )
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert stats["grad_norm"].item() > 1e-3  # the norm before clipping
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_schedules_count_epochs_from_one_and_refuse_bad_values():
    betas = [vae.beta_schedule(e, 0.5, kl_warmup=4) for e in range(1, 8)]
    assert betas == [0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [vae.beta_schedule(e, 2.0) for e in (1, 5)] == [2.0, 2.0]
    for epoch, beta, warmup in ((0, 1.0, 3), (1, -0.5, 0), (2, 1.0, -1)):
        with pytest.raises(ValueError, match="epochs count from 1"):
            vae.beta_schedule(epoch, beta, warmup)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.002)
    scheduler = vae.cosine_decay(optimizer, epochs=4)
    lrs = []
    for _ in range(4):  # an epoch, then the scheduler's step
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.002, 0.001 * (1 + math.sqrt(0.5)), 0.001, 0.001 * (1 - math.sqrt(0.5))]
    assert lrs == pytest.approx(expected, rel=1e-12)
    resumed = vae.cosine_decay(optimizer, epochs=8, last_epoch=1)  # after epoch 2, now of 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * (1 + math.cos(math.pi / 4)))
    assert resumed.last_epoch == 2


def test_train_epoch_refuses_a_negative_beta_or_free_bits_before_any_step():
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters())
    images = images_of(8, seed=1)
    for kwargs in (dict(beta=-1.0), dict(free_bits=-0.5)):
        with pytest.raises(ValueError, match="beta and free_bits must be >= 0"):
            vae.train_epoch(model, optimizer, images, batch_size=4, **kwargs)
    for kwargs in (dict(beta=0.5), dict(free_bits=0.1)):  # the IWAE bound has neither
        with pytest.raises(ValueError, match="the IWAE objective has beta 1 and no free bits"):
            vae.train_epoch(model, optimizer, images, batch_size=4, iwae_samples=3, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_conditional_decoder_learns_what_the_label_means():
    # Class 0 is dark and class 1 bright; the images carry nothing else. After training,
    # decoding the same z from the prior must give dark images for y = 0, bright for y = 1.
    torch.manual_seed(0)
    model = vae.MLPVAE(image_size=8, channels=1, latent_dim=2, hidden=(32, 16), num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        y = torch.randint(0, 2, (64,))
        x = (0.1 + 0.8 * y.float()).view(-1, 1, 1, 1) + 0.05 * torch.rand(64, 1, 8, 8)
        vae.train_step(model, opt, x, y=y)
    z = torch.randn(16, 2)
    with torch.no_grad():
        dark = model.decode(z, torch.zeros(16, dtype=torch.long))
        bright = model.decode(z, torch.ones(16, dtype=torch.long))
    assert dark.mean() < 0.25 and bright.mean() > 0.75


def test_a_short_training_learns_what_the_classic_bugs_would_break():
    # Checked with formulas of its own, not through vae_loss or evaluate. A loss fed
    # probabilities instead of logits, or a reconstruction averaged over pixels (a beta of 784),
    # leaves the KL near 0 and decode(mu) at the mean image; a flipped KL sign sends it off.
    torch.manual_seed(0)
    images = (images_of(320, seed=6) > 127).to(torch.uint8) * 255  # binary
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
    model = vae.MLPVAE(latent_dim=4)
    images = images_of(50, seed=4)
    state = torch.get_rng_state()
    a = vae.evaluate(model, images, batch_size=16)
    assert vae.evaluate(model, images, batch_size=16) == a  # a generator of its own, seeded
    assert torch.equal(torch.get_rng_state(), state)
    c = vae.evaluate(model, images, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert a["recon"] != c["recon"]  # z is drawn from q(z|x), not set to mu
    assert a["kl"] == pytest.approx(c["kl"])  # the KL is in closed form, no sampling
    assert a["neg_elbo"] == pytest.approx(a["recon"] + a["kl"])
    assert sum(a["kl_per_dim"]) == pytest.approx(a["kl"], rel=1e-5) and len(a["kl_per_dim"]) == 4


def test_active_units_count_the_dimensions_that_vary_across_images():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=6)
    with torch.no_grad():
        model.fc_mu.weight[2:] = 0  # mu_2..5 = bias for every image: inactive
        model.fc_mu.weight[:2] *= 50  # mu_0, mu_1 vary strongly across images
    assert vae.evaluate(model, images_of(100, seed=11), batch_size=32)["active_units"] == 2


def test_log_likelihood_uses_the_gaussian_of_the_model_and_takes_one_hot_labels():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(32,), num_classes=4)
    x = vae.to_float(images_of(6, seed=3))
    y = torch.tensor([0, 1, 2, 3, 0, 1])

    def normal(logits, target):  # the same likelihood, written with torch.distributions
        return Normal(torch.sigmoid(logits), 0.1).log_prob(target).flatten(1).sum(1)

    ours = vae.log_likelihood(model, x, 7, y, "gaussian", 0.1, max_decodes=12)  # 2 per chunk
    torch.testing.assert_close(
        ours, vae.log_likelihood(model, x, 7, y, likelihood=normal, max_decodes=12)
    )
    one_hot = F.one_hot(y, 4).float()
    assert torch.equal(
        ours, vae.log_likelihood(model, x, 7, one_hot, "gaussian", 0.1, max_decodes=12)
    )
    assert not torch.allclose(ours, vae.log_likelihood(model, x, 7, y, max_decodes=12))  # Bernoulli


def test_iwae_loss_with_one_sample_is_the_elbo_with_a_sampled_kl_and_trains_the_encoder():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,))
    x = torch.bernoulli(vae.to_float(images_of(5, seed=4)))
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


def test_training_the_iwae_bound_lowers_it():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=4, hidden=(64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.bernoulli(vae.to_float(images_of(64, seed=2)))

    def bound():
        return vae.log_likelihood(model, x, 5, generator=torch.Generator().manual_seed(0)).mean()

    before = bound()
    for _ in range(20):
        stats = vae.train_step(model, optimizer, x, iwae_samples=5)
    assert bound() > before + 10
    assert stats["loss"] <= stats["recon"] + stats["kl"] + 1  # -IWAE <~ -ELBO


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
        mu = (x.flatten(1) - self.b) @ self.A.T * 0.7  # shrunk mean
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
    estimate = functools.partial(vae.log_likelihood, model, x, likelihood=model.log_px_given_z)
    elbo = torch.stack([estimate(k=1, generator=g) for _ in range(200)]).mean(0)  # E[1 sample]
    k_10 = torch.stack([estimate(k=10, generator=g) for _ in range(200)]).mean(0)
    assert (exact - estimate(k=20000, max_decodes=4096)).abs().max() < 0.02
    assert (exact - k_10 > 0.01).all() and (k_10 - elbo > 0.05).all()  # the bound rises with K
    with pytest.raises(ValueError, match="needs k >= 1"):
        estimate(k=0)


@pytest.mark.parametrize("cls", [vae.ConvVAE, vae.MLPVAE])
def test_interpolate_and_reconstruct_decode_the_posterior_means(cls):
    torch.manual_seed(0)
    model = cls(latent_dim=4)
    model(torch.rand(8, 1, 28, 28))
    x_a, x_b = torch.rand(1, 28, 28), torch.rand(1, 28, 28)
    path = vae.interpolate(model, x_a, x_b, steps=7)
    assert path.shape == (7, 1, 28, 28)
    assert torch.equal(vae.interpolate(model, x_a[None], x_b[None], steps=7), path)  # (1, C, H, W)
    with pytest.raises(ValueError, match="single images"):
        vae.interpolate(model, torch.rand(2, 1, 28, 28), x_b)
    x_hat = vae.reconstruct(model, torch.stack([x_a, x_b]))
    with torch.no_grad():
        mu = model.eval().encode(torch.stack([x_a, x_b]))[0]
        ends, middle = model.decode(mu), model.decode(mu.mean(0, keepdim=True))
    assert torch.equal(x_hat, ends)
    torch.testing.assert_close(path[0], ends[0])
    torch.testing.assert_close(path[-1], ends[1])
    torch.testing.assert_close(path[3], middle[0])  # the straight line between the means


@pytest.mark.parametrize(
    "model",
    [
        vae.MLPVAE(hidden=(300,), latent_dim=5),
        vae.ConvVAE(image_size=32, channels=3, base_channels=4, latent_dim=2, num_classes=3),
        vae.ConvVAE(base_channels=4, latent_dim=2, res_blocks=1),
    ],
)
def test_save_model_and_load_model_round_trip_any_model(tmp_path, model):
    model.eval()
    vae.save_model(model, tmp_path / "m.pt", note="mine")  # torch.save's order
    loaded = vae.load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model) and loaded.model_args == model.model_args
    assert torch.load(tmp_path / "m.pt")["note"] == "mine" and not loaded.training
    x = torch.rand(2, model.channels, model.image_size, model.image_size)
    y = torch.tensor([0, 2]) if model.num_classes else None
    assert torch.equal(vae.reconstruct(loaded, x, y), vae.reconstruct(model, x, y))
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # the likeliest other file
    with pytest.raises(
        ValueError, match="'.*weights.pt' was not written by save_model.*load_state_dict"
    ):
        vae.load_model(tmp_path / "weights.pt")


PART_ONE_ALONE = """
import importlib.abc, importlib.machinery, json, sys
class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # the tool's libraries
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "PIL", "matplotlib", "tqdm"):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}")
sys.meta_path.insert(0, NotInstalled())
import torch
import myvae
torch.manual_seed(0)
images = torch.load("images.pt")  # (256, 1, 28, 28) uint8
model = myvae.ConvVAE(image_size=28, channels=1, latent_dim=8, res_blocks=1)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
scheduler = myvae.cosine_decay(optimizer, epochs=5)
losses = []
for e in range(1, 6):
    beta = myvae.beta_schedule(e, 1.0, 2)
    losses.append(myvae.train_epoch(model, optimizer, images, batch_size=32, beta=beta)["loss"])
    scheduler.step()
x = images[:8]
model.eval()
torch.manual_seed(1)
logits, mu, logvar = model(x)  # uint8 taken as it comes, and the loss takes the output
loss = myvae.vae_loss(logits, x, mu, logvar)[0].item()
torch.manual_seed(1)
same = torch.equal(model(x.float() / 255)[0], logits)
errors = {}
for name, call in dict(
    floats_0_255=lambda: model(x.float()),
    resized=lambda: model.encode(x.float() / 255 * 1.37 - 0.17),
    labels_unconditional=lambda: myvae.train_epoch(model, optimizer, images, labels=torch.zeros(256)),
    sample_with_labels=lambda: model.sample(2, torch.zeros(2, dtype=torch.long)),
    interpolate_no_labels=lambda: myvae.interpolate(myvae.MLPVAE(num_classes=3), x[0], x[1]),
).items():
    try:
        call()
    except ValueError as e:
        errors[name] = str(e)
myvae.save_model(model, "model.pt")
loaded = myvae.load_model("model.pt")
print(json.dumps(dict(
    losses=losses, loss=loss, logits=[logits.min().item(), logits.max().item()], same=same,
    errors=errors, test=myvae.evaluate(model, images[:64])["neg_elbo"],
    nll=myvae.log_likelihood(model, images[:4], k=10).tolist(),
    samples=list(model.sample(3).shape), path=list(myvae.interpolate(model, x[0], x[1], 5).shape),
    loaded=torch.equal(myvae.reconstruct(loaded, x), myvae.reconstruct(model, x)),
    imported=sorted({"torchvision", "PIL", "matplotlib", "tqdm"} & set(sys.modules)))))
"""


def test_part_one_copied_alone_works_and_refuses_each_misuse_in_one_sentence(tmp_path):
    source = open(os.path.join(HERE, "vae.py")).read()
    part1 = source[: source.index("\n# Part 2:")]
    code = part1[part1.index('"""', 3) :]  # below the module's docstring, which names the file
    assert not re.findall(r"README|Part 2|--[a-z]|command line", code)
    (tmp_path / "myvae.py").write_text(part1)
    torch.save(images_of(256, seed=13), tmp_path / "images.pt")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = [sys.executable, "-c", PART_ONE_ALONE]
    r = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["losses"][-1] < 0.7 * out["losses"][0], out["losses"]
    assert out["logits"][0] < 0 < 1 < out["logits"][1] and out["same"]  # logits, from uint8 too
    assert out["loss"] < 1.1 * out["losses"][-1]  # the model's output is the loss's input
    assert out["test"] > -max(out["nll"]) > 0  # the NLL, under the -ELBO
    assert out["samples"] == [3, 1, 28, 28] and out["path"] == [5, 1, 28, 28] and out["loaded"]
    assert out["imported"] == []
    errors = out["errors"]
    assert "divide 0-255 images by 255" in errors["floats_0_255"]
    assert "from -0.17 to 1.2" in errors["resized"] and "clamp" in errors["resized"]
    assert "unconditional" in errors["labels_unconditional"] == errors["sample_with_labels"]
    assert "needs the labels y_a and y_b" in errors["interpolate_no_labels"]


# ----------------------------------------------------------------------------
# The tool (Part 2): helpers. Runs happen in this process (`run_main`); a subprocess only where the
# process boundary is what is tested: a fresh import, signals, kill -9, torchrun.


def quick_run(mnist_dir, out, extra=""):
    """The argv of a small, fast MLP run on the test's MNIST into `out`, and the flags `extra`."""
    small = "--model mlp --latent_dim 4 --width 4 --batch_size 64 --device cpu"
    return ["--data_dir", str(mnist_dir), "--out_dir", str(out), *f"{small} {extra}".split()]


def folder_run(data, out, extra=""):
    """The argv of a small conv run on an image folder into `out`, and the flags `extra`."""
    small = "--dataset folder --image_size 32 --latent_dim 2 --width 4 --batch_size 16 --device cpu"
    return ["--data_dir", str(data), "--out_dir", str(out), *f"{small} {extra}".split()]


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


def torchrun(nproc, args, cwd):
    """`torchrun --standalone --nproc_per_node=N vae.py ARGS`: (exit code, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # an abort says where
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv = [*run, f"--nproc_per_node={nproc}", os.path.join(HERE, "vae.py"), *map(str, args)]
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def metrics(path):
    """metrics.csv's rows without the timing columns."""
    with open(path) as f:
        return [
            {k: v for k, v in row.items() if k not in ("seconds", "images_per_sec")}
            for row in csv.DictReader(f)
        ]


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
            Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(
                folder / f"{name}{c}_{i:02d}{ext}"
            )
    return root


# ----------------------------------------------------------------------------
# The tool: datasets and image folders


def test_load_mnist_reads_idx_files_resizes_once_and_binarizes_a_fixed_test_set(mnist_dir):
    data = vae.load_dataset("mnist", mnist_dir)
    assert data["train_x"].shape == (320, 1, 28, 28) and data["train_x"].dtype == torch.uint8
    assert data["test_x"].shape == (120, 1, 28, 28)
    assert data["train_y"].tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.equal(data["train_x"][:, 0], fake_digits(320, seed=0)[0])
    big = vae.load_dataset("mnist", mnist_dir, image_size=32)["train_x"]
    assert big.shape == (320, 1, 32, 32) and big.dtype == torch.uint8
    assert big.float().mean().item() == pytest.approx(
        data["train_x"].float().mean().item(), rel=0.02
    )
    binary = vae.load_dataset("mnist", mnist_dir, binarize=True)["test_x"]
    assert torch.equal(binary, vae.load_dataset("mnist", mnist_dir, binarize=True)["test_x"])
    assert set(binary.unique().tolist()) <= {0, 255}
    assert binary.float().mean().item() == pytest.approx(
        data["test_x"].float().mean().item(), rel=0.05
    )
    batch = vae.get_batch(data["train_x"], torch.arange(320), binarize=True)  # fresh each call
    assert set(batch.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(batch, vae.get_batch(data["train_x"], torch.arange(320), binarize=True))


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
    gray = vae.load_dataset("cifar10", str(tmp_path / "c"), channels=1)["test_x"]
    pil = [
        list(Image.fromarray(im.permute(1, 2, 0).numpy()).convert("L").tobytes()) for im in images
    ]
    assert (gray.int() - torch.tensor(pil).view(6, 1, 32, 32)).abs().max() <= 1  # PIL's luma
    assert vae.load_dataset("cifar10", str(tmp_path / "c"), image_size=64)["test_x"].shape[-1] == 64


def test_load_image_crops_the_centre_square_then_resizes(tmp_path):
    img = torch.zeros(96, 32, 3, dtype=torch.uint8)  # tall: red above, green middle, blue below
    img[:32, :, 0] = 255
    img[32:64, :, 1] = 255
    img[64:, :, 2] = 255
    Image.fromarray(img.numpy()).save(tmp_path / "tall.png")
    rgb = vae.load_image(tmp_path / "tall.png", 32, 3)
    assert rgb.shape == (3, 32, 32) and rgb.dtype == torch.uint8
    assert rgb[1].min() == 255 and rgb[0].max() == 0 and rgb[2].max() == 0  # the green middle
    gray = vae.load_image(tmp_path / "tall.png", 16, 1)
    assert gray[0, 4:12].float().mean().item() == pytest.approx(0.587 * 255, abs=1)  # green's luma


def test_folder_splits_labels_and_file_system_oddities(tmp_path):
    write_image_folder(tmp_path / "split" / "train", per_class=6)
    write_image_folder(
        tmp_path / "split" / "val", classes=("square", "stripes"), per_class=2, seed=1
    )
    write_image_folder(
        tmp_path / "split" / "train" / ".ipynb_checkpoints", classes=None, per_class=1
    )
    train = tmp_path / "split" / "train"
    os.symlink(train / "circle", train / "circle" / "loop")  # a folder that contains itself
    leak = sorted((train / "square").iterdir())[0]
    os.symlink(leak, tmp_path / "split" / "val" / "square" / "leak.png")  # a train image in val
    os.mkfifo(train / "circle" / "pipe.png")  # reading it would wait forever
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
    assert torch.equal(vae.load_folder(str(tmp_path / "flat"), 64, 1)["test_x"], first["test_x"])
    train_set = {bytes(x.flatten().tolist()) for x in first["train_x"]}
    assert not any(bytes(x.flatten().tolist()) in train_set for x in first["test_x"])


@pytest.mark.parametrize(
    "layout, size, channels, model", [("classes", 32, 3, "conv"), ("flat", 64, 1, "mlp")]
)
def test_a_folder_of_images_trains_one_epoch_end_to_end(tmp_path, layout, size, channels, model):
    classes = None if layout == "flat" else ("a", "b", "c")
    data = write_image_folder(tmp_path / "images", classes, ext=".jpg" if channels == 3 else ".png")
    extra = f"--image_size {size} --channels {channels} --model {model} --epochs 1"
    history = vae.main(folder_run(data, tmp_path / "out", extra))
    assert len(history) == 1 and math.isfinite(history[0]["test_neg_elbo"])
    loaded, state = vae.load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert (state["config"]["image_size"], state["config"]["channels"]) == (size, channels)
    assert loaded.sample(2).shape == (2, channels, size, size)
    written = set(os.listdir(tmp_path / "out"))
    assert {"samples.png", "interpolation.png", "latent_pca.png", "best_worst.png"} <= written
    labelled = layout == "classes"
    assert ("class_means.png" in written) == labelled and ("per_class.csv" in written) == labelled
    assert state["config"]["classes"] == (["a", "b", "c"] if labelled else None)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_images_deeper_than_8_bits_are_refused_by_name(tmp_path, mode):
    import numpy as np

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    path = tmp_path / ("image.png" if mode == "I;16" else "image.tif")
    Image.fromarray(np.full((20, 30), 7, dtype)).save(path)
    with pytest.raises(vae.UserError, match=f"cannot read the image '{path}'.*more than 8 bits"):
        vae.load_image(path, 16, 1)


# ----------------------------------------------------------------------------
# The tool: the command line, and one run end to end


def test_help_shows_ranges_and_defaults_follow_the_dataset_and_model():
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


def test_one_run_end_to_end(mnist_dir, tmp_path):
    out = tmp_path / "run"
    history = vae.main(quick_run(mnist_dir, out, "--model conv --epochs 2 --latent_dim 8"))
    written = sorted(f for f in os.listdir(out) if not f.startswith("."))  # .lock: the run's lock
    figures = "best_worst class_means interpolation latent_distribution latent_pca loss_curves "
    figures += (
        "recon_error_hist reconstructions_epoch001 reconstructions_epoch002 samples traversals"
    )
    files = "checkpoint.pt config.json evaluation.json metrics.csv per_class.csv".split()
    assert written == sorted([f"{name}.png" for name in figures.split()] + files)
    rows = metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [r["objective"] for r in rows] == [
        "elbo"
    ] * 2
    for r in rows:
        assert float(r["test_neg_elbo"]) == pytest.approx(
            float(r["test_recon"]) + float(r["test_kl"])
        )
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    # the final report evaluates the same weights with the same generator: the same numbers
    results = json.loads((out / "evaluation.json").read_text())
    for key in ("test_neg_elbo", "test_recon", "test_kl"):
        assert results[key] == float(rows[-1][key]) == history[-1][key], key
    assert results["likelihood"] == "bernoulli" and results["sigma"] is None
    config = json.loads((out / "config.json").read_text())
    assert config["latent_dim"] == 8 and config["model"] == "conv" and config["channels"] == 1
    loaded, state = vae.load_checkpoint(out / "checkpoint.pt")
    assert state["config"] == config and state["epoch"] == 2 and not loaded.training
    assert set(state) >= {"model", "optimizer", "history", "rng"}


def test_the_report_names_what_each_number_is(mnist_dir, tmp_path, capsys):
    vae.main(
        quick_run(
            mnist_dir, tmp_path / "grey", "--epochs 2 --nll_samples 2 --kl_warmup 4 --beta 0.5"
        )
    )
    grey = capsys.readouterr().out.splitlines()
    note = "Bernoulli on pixels that are not binary: not a probability"
    assert note in next(line for line in grey if line.startswith("test -ELBO"))
    assert note in next(line for line in grey if line.startswith("test NLL"))
    results = json.loads((tmp_path / "grey" / "evaluation.json").read_text())
    assert results[
        "beta"
    ] == 0.125 and "test loss at the last epoch's beta, recon + 0.125 kl" in "\n".join(grey)
    assert results["test_loss"] == pytest.approx(results["test_recon"] + 0.125 * results["test_kl"])
    assert "test_nll_bits_per_dim" not in results  # grey pixels: no bits per dimension
    vae.main(quick_run(mnist_dir, tmp_path / "binary", "--epochs 1 --binarize --nll_samples 2"))
    binary = capsys.readouterr().out
    assert "test -ELBO" in binary and note not in binary and "bits/dim" in binary
    results = json.loads((tmp_path / "binary" / "evaluation.json").read_text())
    assert results["test_nll_bits_per_dim"] == pytest.approx(
        results["test_nll"] / (784 * math.log(2))
    )
    vae.main(
        quick_run(mnist_dir, tmp_path / "gauss", "--epochs 1 --likelihood gaussian --nll_samples 2")
    )
    gaussian = capsys.readouterr().out
    assert "a Gaussian density of pixels in [0, 1]" in gaussian and "bits/dim" not in gaussian
    results = json.loads((tmp_path / "gauss" / "evaluation.json").read_text())
    assert results["sigma"] == 0.1 and "test_nll_bits_per_dim" not in results


def test_a_run_folder_is_never_replaced_silently_nor_written_by_two_runs(
    mnist_dir, tmp_path, capsys
):
    (tmp_path / "samples.png").write_bytes(b"a figure of an evaluation")
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 1"), capsys)
    assert one_sentence(code, err) and "already holds the files of another run (samples.png)" in err
    (tmp_path / "notes.txt").write_text("the user's own file")
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 2 --latent_dim 2 --overwrite"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 1"), capsys)
    assert one_sentence(code, err) and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert (tmp_path / "manifold.png").exists()  # latent_dim 2
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1 --overwrite"))
    left = set(os.listdir(tmp_path))
    assert "manifold.png" not in left and "reconstructions_epoch002.png" not in left
    assert "notes.txt" in left and "reconstructions_epoch001.png" in left
    lock = vae.prepare_output_dir(str(tmp_path), resume=True)  # as a run writing there holds it
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 1 --overwrite"), capsys)
    assert one_sentence(code, err) and f"another run is writing into '{tmp_path}' now" in err
    lock.close()  # as the run's end, or its crash, releases it


def test_the_loss_curves_show_the_elbo_and_name_the_objective_of_every_epoch(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    rows = [
        dict(
            epoch=e,
            beta=b,
            objective="elbo",
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
    resumed = [dict(r, beta=1.0, objective="elbo" if r["epoch"] < 3 else "iwae5") for r in rows]
    vae.plot_losses(resumed, tmp_path / "iwae.png")
    titles = [fig.axes[0].get_title() for fig in figures]
    assert (
        titles[0] == "-ELBO = recon + KL\n(the run minimised recon + beta * KL, beta from 0 to 0.5)"
    )
    assert titles[1] == "-ELBO = recon + KL"
    assert (
        titles[2]
        == "-ELBO = recon + KL\n(trained on the ELBO,\nthen from epoch 3 on the IWAE5 bound)"
    )
    train, test = (line.get_ydata().tolist() for line in figures[0].axes[0].get_lines())
    assert train == [3.0] * 4 and test == [3.5] * 4  # the -ELBO, not the beta-weighted loss


@pytest.mark.parametrize(
    "case", ["all-equal images", "one image", "one class", "values near 1e30", "latent_dim 1"]
)
def test_the_final_report_survives_degenerate_statistics(tmp_path, case):
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
    data = dict(test_x=images, labels=labels, classes=classes)
    results = vae.report(model, data, tmp_path, "bernoulli", 0.1, 1.0, 0, 2, (4, 9), {})
    named = "evaluation.json samples.png interpolation.png latent_distribution.png traversals.png "
    named += "class_means.png latent_pca.png recon_error_hist.png best_worst.png per_class.csv"
    assert sorted(os.listdir(tmp_path)) == sorted(named.split())
    assert math.isfinite(results["test_neg_elbo"]) and len(results["per_class"]) >= 1


def test_the_latent_figure_shows_every_posterior_sigma(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    logvar = torch.log(torch.tensor([[0.25, 4.0], [1.0, 9.0]]))  # sigmas 0.5, 2, 1 and 3
    stats = dict(kl_per_dim=[1.0, 0.5], mu_var=[1.0, 0.0])
    vae.save_latent_distribution(torch.zeros(2, 2), logvar, stats, tmp_path / "latent.png")
    bars = figures[0].axes[1].patches
    assert sum(bar.get_height() for bar in bars) == 4  # none falls outside the drawn range
    assert max(bar.get_x() + bar.get_width() for bar in bars) >= 3.0 - 1e-6


def test_class_names_that_matplotlib_would_read_as_mathematics(tmp_path, monkeypatch):
    names = ("$x$", "a$b", "$x^$", "$\\notacommand$", "50% off_{1}", os.fsdecode(b"caf\xe9"))
    data = write_image_folder(tmp_path / "images" / "train", classes=names, per_class=3).parent
    write_image_folder(data / "val", classes=names, per_class=1, seed=1)
    figures = capture_figures(monkeypatch)
    vae.main(folder_run(data, tmp_path / "out", "--epochs 1"))
    with open(tmp_path / "out" / "per_class.csv", errors="surrogateescape") as f:
        assert [row["name"] for row in csv.DictReader(f)] == sorted(names)  # bytes and all
    shown = []
    for ax in (ax for fig in figures for ax in fig.axes):
        legend = ax.get_legend().texts if ax.get_legend() else []
        shown += [t.get_text() for t in ax.get_yticklabels() + ax.texts + legend]
    drawn = [os.fsencode(name).decode("utf-8", "replace").replace("$", r"\$") for name in names]
    assert all(name in shown for name in drawn)  # as text: $ escaped, bad bytes as U+FFFD


def test_a_conditional_run_samples_each_class_and_its_checkpoint_needs_its_classes(
    tmp_path, capsys
):
    three = write_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=4)
    two = write_image_folder(tmp_path / "two", classes=("a", "b"), per_class=4)
    vae.main(folder_run(three, tmp_path / "run", "--epochs 1 --conditional --nll_samples 3"))
    written = set(os.listdir(tmp_path / "run"))
    assert "samples_per_class.png" in written and "samples.png" not in written
    model, state = vae.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert model.num_classes == 3 and state["config"]["classes"] == ["a", "b", "c"]
    assert "-log p(x|y) (K=3)" in capsys.readouterr().out
    for argv in (
        ["--resume", "--out_dir", tmp_path / "run", "--epochs", 2, "--data_dir", two],
        ["--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data_dir", two],
    ):
        code, _, err = run_main(argv, capsys)
        assert one_sentence(code, err) and "is conditional on 3 classes, and the data in" in err


# ----------------------------------------------------------------------------
# The tool: several processes (torchrun, gloo on the CPU)


def test_two_processes_train_together_and_write_one_set_of_outputs(mnist_dir, tmp_path):
    rc, out, err = torchrun(2, quick_run(mnist_dir, tmp_path / "run", "--epochs 2"), cwd=tmp_path)
    assert rc == 0, out + err  # rank 0's log says how far the run got
    assert "device cpu x 2 processes" in out
    epochs = [
        line.split("|")[0].split()[1] for line in out.splitlines() if line.startswith("epoch")
    ]
    assert epochs == ["1/2", "2/2"]  # rank 0 prints, once
    assert sorted(os.listdir(tmp_path)) == ["run"]
    losses = [float(r["train_loss"]) for r in metrics(tmp_path / "run" / "metrics.csv")]
    assert losses[1] < losses[0]
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".tmp-")]
    model, state = vae.load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # as a single process
    assert state["config"]["epochs"] == 2 and model.latent_dim == 4


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


# ----------------------------------------------------------------------------
# The tool: checkpoints, resume, and evaluating a saved model


def test_checkpoint_mode_reproduces_the_run_without_touching_it(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    extra = "--model conv --width 8 --epochs 2 --latent_dim 2 --binarize --nll_samples 20"
    vae.main(quick_run(mnist_dir, run, extra))  # conv: NHWC in the run, and so in this mode
    ckpt = run / "checkpoint.pt"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    trained = json.loads((run / "evaluation.json").read_text())
    assert trained["test_nll"] < trained["test_neg_elbo"] + 1.0  # K=20 is tighter than the ELBO
    code, out, _ = run_main(
        ["--checkpoint", ckpt, "--nll_samples", 20, "--epochs", 5, "--lr", 0.1], capsys
    )
    assert code == 0 and "so it ignores --epochs, --lr\n" in out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    results = json.loads((run / "eval" / "evaluation.json").read_text())
    for key in ("test_neg_elbo", "test_recon", "test_kl", "test_loss", "test_nll", "epoch"):
        assert results[key] == trained[key], key  # the same data, weights and seed: bit for bit
    assert (run / "eval" / "samples.png").read_bytes() == (run / "samples.png").read_bytes()
    assert {"reconstructions.png", "loss_curves.png", "manifold.png"} <= set(
        os.listdir(run / "eval")
    )
    other = vae.main(
        ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "seed5"), "--seed", "5"]
    )
    assert other["test_kl"] == trained["test_kl"]  # closed form: no draw
    assert other["test_recon"] != trained["test_recon"]  # z drawn with seed 5
    code, _, err = run_main(["--checkpoint", ckpt], capsys)  # eval/ now holds an evaluation
    assert one_sentence(code, err) and "already holds the files of another run" in err
    for extra in ([], ["--overwrite"]):  # a training run's folder: never, not even with --overwrite
        code, _, err = run_main(["--checkpoint", ckpt, "--out_dir", run, *extra], capsys)
        assert one_sentence(code, err) and "holds a training run" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_model_saved_from_python_is_evaluated_with_the_settings_its_note_names(
    mnist_dir, tmp_path, capsys
):
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=2, hidden=(32,))
    vae.save_model(model, tmp_path / "mine.pt")
    argv = ["--checkpoint", tmp_path / "mine.pt", "--data_dir", mnist_dir, "--nll_samples", 3]
    code, out, _ = run_main(
        argv + "--likelihood gaussian --sigma 0.5 --beta 2 --epochs 3".split(), capsys
    )
    assert code == 0 and "so it ignores --epochs\n" in out  # and nothing it then uses
    assert "evaluated with --dataset mnist --likelihood gaussian --sigma 0.5 --beta 2.0" in out
    results = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert (results["likelihood"], results["sigma"], results["beta"]) == ("gaussian", 0.5, 2.0)
    test_x = vae.load_dataset("mnist", mnist_dir)["test_x"]
    assert results["test_nll"] == vae.evaluate_nll(model, test_x, 3, None, "gaussian", 0.5)
    assert results["epoch"] is None and (tmp_path / "eval" / "manifold.png").exists()


def test_resume_continues_bit_for_bit_and_seeded_runs_repeat(mnist_dir, tmp_path):
    extra = "--binarize --kl_warmup 2"  # each uses the random draws or the epoch
    vae.main(quick_run(mnist_dir, tmp_path / "a", f"--epochs 3 {extra}"))
    vae.main(quick_run(mnist_dir, tmp_path / "c", f"--epochs 1 {extra}"))
    vae.main(quick_run(mnist_dir, tmp_path / "c", "--epochs 3 --resume"))
    a = metrics(tmp_path / "a" / "metrics.csv")
    assert [float(r["beta"]) for r in a] == [0.0, 0.5, 1.0]
    assert [float(r["lr"]) for r in a] == pytest.approx([0.002, 0.0015, 0.0005])  # the cosine
    assert metrics(tmp_path / "c" / "metrics.csv") == a  # stopped after 1, resumed to 3
    weights = [torch.load(tmp_path / d / "checkpoint.pt")["model"] for d in "ac"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_elbo_run_may_resume_under_the_iwae_bound_and_says_so(mnist_dir, tmp_path, capsys):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1"))
    code, out, _ = run_main(
        quick_run(mnist_dir, tmp_path, "--epochs 2 --resume --iwae_samples 3"), capsys
    )
    rows = metrics(tmp_path / "metrics.csv")
    assert code == 0 and "the saved settings but --epochs 2, --iwae_samples 3\n" in out
    assert "| train -IWAE3 " in out and [r["objective"] for r in rows] == ["elbo", "iwae3"]
    vae.main(quick_run(mnist_dir, tmp_path / "b", "--epochs 1 --beta 0.5"))
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    code, _, err = run_main(
        quick_run(mnist_dir, tmp_path / "b", "--epochs 2 --resume --iwae_samples 2"), capsys
    )
    assert one_sentence(code, err) and "which the IWAE bound has not; resume it without" in err
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before


# ----------------------------------------------------------------------------
# The tool: never lose a run (kill -9, Ctrl-C, a non-finite loss, memory, a full disk)


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(mnist_dir, tmp_path):
    rng = random.Random(0)
    ckpt = tmp_path / "checkpoint.pt"
    for _ in range(2):
        resume = "--resume" if ckpt.exists() else ""
        run = quick_run(mnist_dir, tmp_path, f"--epochs 100000 {resume}")
        argv = [sys.executable, os.path.join(HERE, "vae.py"), *run]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        logged = (line for line in proc.stdout if line.startswith("epoch"))
        next(logged)  # the thing waited on: an epoch's log line; after the next one, its
        next(logged)  # checkpoint is whole, and the kill comes at a random moment after that
        time.sleep(rng.uniform(0.2, 1.5))
        proc.kill()
        proc.wait()
        vae.load_checkpoint(ckpt)  # whole, whenever the kill came
    saved = torch.load(ckpt)["epoch"]
    (tmp_path / ".tmp-abcdcheckpoint.pt").write_bytes(b"half")  # as a kill during a save leaves it
    vae.main(quick_run(mnist_dir, tmp_path, f"--epochs {saved + 1} --resume"))
    assert [int(r["epoch"]) for r in metrics(tmp_path / "metrics.csv")] == list(range(1, saved + 2))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # cleaned up


def test_ctrl_c_stops_training_with_the_last_epoch_saved(mnist_dir, tmp_path):
    argv = [
        sys.executable,
        os.path.join(HERE, "vae.py"),
        *quick_run(mnist_dir, tmp_path, "--epochs 500"),
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
    for line in proc.stdout:  # after epoch 1's log line, its checkpoint is being written
        if line.startswith("epoch   2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert one_sentence(proc.returncode, err, 130) and "stopped by Ctrl-C in epoch" in err
    assert "is intact; continue with: python vae.py --resume" in err
    state = torch.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] >= 1 and len(state["history"]) == state["epoch"]


def test_ctrl_c_before_any_checkpoint_gives_no_advice(mnist_dir, tmp_path, monkeypatch, capsys):
    def ctrl_c(model):
        raise KeyboardInterrupt

    patch_step(monkeypatch, 2, ctrl_c)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 1"), capsys)
    assert (
        one_sentence(code, err, 130)
        and "stopped by Ctrl-C in epoch 1; no epoch had finished" in err
    )
    assert "--resume" not in err and not (tmp_path / "checkpoint.pt").exists()


def blow_up(model):
    """Every weight 1e30, as a far too large learning rate would leave them."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e30)


@pytest.mark.parametrize("step", [2, 5])  # in epoch 2; or its last step, whose own numbers are fine
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys, step
):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1"))  # 5 steps of 64 images per epoch
    before = (tmp_path / "checkpoint.pt").read_bytes()
    patch_step(monkeypatch, step, blow_up)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 3 --resume"), capsys)
    assert one_sentence(code, err, 1) and "the loss became non-finite in epoch 2" in err
    assert "--lr" in err and "--grad_clip" in err and "checkpoint of epoch 1" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [int(r["epoch"]) for r in metrics(tmp_path / "metrics.csv")] == [1]  # no NaN row


def test_the_collapse_warning_says_what_it_saw():
    assert vae.collapse_warning(kl=5.0, active_units=3, n_images=100) is None
    for kl, au, start in ((0.05, 3, "posterior collapse"), (5.0, 0, "no active latent unit")):
        text = vae.collapse_warning(kl, au, n_images=100)
        assert text.startswith(f"warning: {start}") and "--kl_warmup" in text, text
    assert "is the prior" not in vae.collapse_warning(5.0, 0, n_images=100)  # the KL says it isn't
    # a handful of test images has no variance to speak of: only the KL can tell
    assert vae.collapse_warning(kl=5.0, active_units=0, n_images=1) is None


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_running_out_of_memory_is_one_sentence_and_keeps_the_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys, error
):
    def out_of_memory(model):
        raise error

    patch_step(monkeypatch, 6, out_of_memory)  # the first step of epoch 2
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 2"), capsys)
    assert one_sentence(code, err, 1) and "memory ran out" in err and "--batch_size" in err
    assert vae.load_checkpoint(tmp_path / "checkpoint.pt")[1]["epoch"] == 1


def test_a_full_disk_gets_one_sentence_and_keeps_the_previous_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def full(fd):  # as a full disk answers the flush of a file's last bytes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path, "--epochs 2 --resume"), capsys)
    assert one_sentence(code, err, 1) and "No space left on device" in err
    assert "previous version, if any, is intact" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


# ----------------------------------------------------------------------------
# The tool: the table of bad inputs in README.md, each one sentence and nothing written


def scandir_denied(scandir, name, path):
    """os.scandir, but for a folder called `name`, whose listing is denied."""
    if os.path.basename(path) == name:
        raise PermissionError(13, "Permission denied", str(path))
    return scandir(path)


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """The folder of a finished one-epoch run, for the cases that start from a run."""
    out = tmp_path_factory.mktemp("trained")
    vae.main(quick_run(mnist_dir, out, "--epochs 1"))
    return out


def bad_folder(what, d, monkeypatch):
    """Make in d the image folder that `what` names."""
    if what == "mismatch":
        write_image_folder(d / "train", classes=("a", "b"), per_class=2)
        write_image_folder(d / "test", classes=("a", "z"), per_class=2)
    elif what == "empty":
        d.mkdir()
    elif what:
        write_image_folder(d, classes=None if what == "flat" else ("a", "b"), per_class=4)
    if what == "broken":
        (d / "b" / "broken.jpg").write_bytes(b"not a JPEG at all")
    elif what == "huge":
        Image.new("RGB", (300, 200)).save(d / "b" / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    elif what == "unlistable":  # as chmod 0 would, for a user other than root
        monkeypatch.setattr(os, "scandir", functools.partial(scandir_denied, os.scandir, "b"))
    return ["--dataset", "folder", "--data_dir", d, "--image_size", 32]


def bad_checkpoint(what, d):
    """Damage the checkpoint in d as `what` says; returns the argv that evaluates it."""
    path = d / "checkpoint.pt"
    state = torch.load(path)
    if what == "pickle":
        state["payload"] = os.getcwd  # code that loading would run
    elif what == "tensors":
        state = {"weights": torch.zeros(3)}
    elif what == "misfit":
        state["model_args"]["latent_dim"] = 7
    elif what == "partial":
        del state["history"]
    data = path.read_bytes()
    torch.save(state, path)
    if what == "text":
        path.write_text("this is a text file, not a checkpoint\n")
    elif what == "truncated":
        path.write_bytes(data[:2000])
    return [] if what == "partial" else ["--checkpoint", path, "--out_dir", d.parent / "out"]


def bad_input(setup, d, trained, monkeypatch):
    """Make the bad input that `setup` names in folder d; returns the argv that reaches it."""
    kind, _, what = setup.partition(" ")
    if kind == "mnist":  # a closed local port as the proxy: every download fails at once
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
        if what == "truncated":
            path = write_small_mnist(d) / "train-images-idx3-ubyte"
            path.write_bytes(path.read_bytes()[:1000])
        return ["--data_dir", d]
    if kind == "folder":
        return bad_folder(what, d, monkeypatch)
    if kind == "torchrun":  # as torchrun's two processes would
        monkeypatch.setattr(
            vae, "process_group", lambda device: contextlib.nullcontext((0, 2, device))
        )
    shutil.copytree(trained, d)
    data_dir = json.loads((d / "config.json").read_text())["data_dir"]
    return (
        bad_checkpoint(what, d)
        if kind == "checkpoint"
        else ["--out_dir", d, "--data_dir", data_dir]
    )


NO_LOAD = "cannot be loaded as a model of vae.py"
NO_GPU = "--device cuda" if not torch.cuda.is_available() else "--device mps"


@pytest.mark.parametrize(
    "setup, argv, sentence",
    [
        ("mnist", "", "MNIST in '{d}/MNIST/raw' is not there and could not be downloaded"),
        ("mnist", "--dataset cifar10", "put its 7 original files there (data_batch_1"),
        ("mnist truncated", "", "MNIST in '{d}/MNIST/raw' cannot be read"),
        ("folder", "", "is not a folder"),
        ("folder empty", "", "holds 0 images vae.py reads"),
        ("folder mismatch", "", "has classes ['a', 'z'] that do not match those of"),
        ("folder broken", "", "cannot read the image '{d}/b/broken.jpg'"),
        ("folder huge", "", "exceeds limit of 50000 pixels"),
        ("folder unlistable", "", "cannot read or write '{d}/b' (Permission denied)"),
        ("folder flat", "--conditional", "--conditional needs class labels"),
        ("checkpoint missing", "--checkpoint {d}/none.pt", "there is no checkpoint at"),
        ("checkpoint text", "", NO_LOAD),
        ("checkpoint truncated", "", NO_LOAD),
        ("checkpoint pickle", "", f"{NO_LOAD} (Weights only load failed"),
        ("checkpoint tensors", "", "was not written by save_model"),
        ("checkpoint misfit", "", "the weights in '{d}/checkpoint.pt' do not fit the MLPVAE"),
        ("checkpoint partial", "--resume --out_dir {d}", "holds a model but not a training run"),
        ("run", "--resume --out_dir {d}/none", "--resume found no checkpoint.pt in"),
        ("run", "--resume --epochs 1", "has finished epoch 1 of 1"),
        ("run", "--epochs 1", "continue it with --resume, replace them with --overwrite"),
        ("run", "--out_dir {d}/checkpoint.pt/x", "cannot create --out_dir"),
        ("run", "--checkpoint {d}/checkpoint.pt --out_dir {d}", "holds a training run"),
        ("torchrun", "--out_dir {d}/new --batch_size 63", "--batch_size 63 is the batch of all 2"),
        ("", NO_GPU, "was asked for but is not available here"),
        ("", "--epochs -1", "argument --epochs: expected an integer from 0 to 100000, got '-1'"),
        ("", "--seed 1e20", "argument --seed: expected an integer from 0 to 4294967295"),
        ("", "--lr nan", "argument --lr: expected a number from 1e-08 to 10.0"),
        ("", "--image_size 30", "invalid choice: 30 (choose from 28, 32, 64, 128)"),
        ("", "--epochs 0", "--epochs 0 trains nothing; to evaluate a saved model, give"),
        ("", "--resume --overwrite", "--resume continues the run in --out_dir"),
        ("", "--epoch 40", "unrecognized arguments: --epoch 40"),  # no abbreviations
        ("", "--dataset folder", "--dataset folder needs --data_dir"),
        ("", "--iwae_samples 5 --kl_warmup 2", "--iwae_samples trains the IWAE bound, which has"),
    ],
)
def test_bad_input_gets_one_sentence_and_changes_nothing(
    trained, tmp_path, monkeypatch, capsys, setup, argv, sentence
):
    monkeypatch.chdir(tmp_path)  # the default --out_dir, runs/conv, would be made here
    d = tmp_path / "data"
    extra = bad_input(setup, d, trained, monkeypatch) if setup else []
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run_main([*extra, *argv.format(d=d).split()], capsys)
    lines = err.strip().splitlines()  # one sentence; from argparse, after its usage lines
    assert code == (1 if "Permission denied" in sentence else 2), err
    assert lines[-1].startswith("vae.py: error: ") and sentence.format(d=d) in lines[-1], err
    assert "Traceback" not in err and (len(lines) == 1 or lines[0].startswith("usage: "))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
