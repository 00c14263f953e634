"""Tests for vae.py, in two parts like the file. First the specification of the VAE (Part 1):
shapes, the KL and the likelihoods against torch.distributions, gradients, the exact log p(x) of
a linear-Gaussian model, a learning test, the importance-weighted bound, and Part 1 copied alone.
Then the tool (Part 2), on small data the tests write themselves: one run per kind of data,
resume, checkpoint mode, two processes under torchrun (gloo), and the table of bad inputs. CPU
only where no GPU is present; run with `python -m pytest -q -n 2`."""

import csv
import functools
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys

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
# The tool (Part 2), on small data the tests write. Runs happen in this process (`run_main`); a
# subprocess only where the process boundary is what is tested: a fresh import, Ctrl-C, torchrun.


def quick_run(mnist_dir, out, extra=""):
    """The argv of a small, fast MLP run on the test's MNIST into `out`, and the flags `extra`."""
    small = "--model mlp --latent_dim 4 --width 4 --batch_size 64 --device cpu"
    return ["--data_dir", str(mnist_dir), "--out_dir", str(out), *f"{small} {extra}".split()]


def run_main(argv, capsys):
    """vae.main(argv) here: (exit code, stdout, stderr), as the command line would end."""
    capsys.readouterr()
    code = 0
    try:
        vae.main([str(a) for a in argv])
    except SystemExit as e:  # Python prints a message to stderr and exits with 1
        code = 1 if isinstance(e.code, str) else e.code
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def metrics(path):
    """metrics.csv's rows without the timing columns."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [
        {k: v for k, v in r.items() if k not in ("train_seconds", "images_per_sec")} for r in rows
    ]


def write_image_folder(root, classes=("circle", "square", "stripes"), per_class=8, seed=0):
    """per_class RGB images per class, of varied sizes, each class a colour; classes None: flat."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes or ("flat",) * 3):
        folder = root if classes is None else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = torch.randint(40, 90, (2,), generator=g).tolist()
            img = torch.rand(h, w, 3, generator=g) * 60
            img[..., c % 3] += 150  # the class shows in its colour channel
            image = Image.fromarray(img.to(torch.uint8).numpy())
            image.save(folder / f"{name}{c}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """The folder of a finished two-epoch MLP run."""
    out = tmp_path_factory.mktemp("trained") / "run"
    vae.main(quick_run(mnist_dir, out, "--epochs 2 --binarize --nll_samples 20"))
    return out


def test_a_run_writes_every_file_and_its_numbers_agree(mnist_dir, tmp_path, monkeypatch, capsys):
    labels, save_grid = {}, vae.save_grid

    def keep_labels(rows, path, title, *row_and_col_labels):
        labels[os.path.basename(path)] = row_and_col_labels
        save_grid(rows, path, title, *row_and_col_labels)

    monkeypatch.setattr(vae, "save_grid", keep_labels)
    history = vae.main(quick_run(mnist_dir, tmp_path, "--model conv --epochs 2 --latent_dim 8"))
    log = capsys.readouterr().out
    figures = "best_worst class_means interpolation latent_distribution latent_pca loss_curves "
    figures += "reconstructions_epoch001 reconstructions_epoch002 samples traversals"
    files = "checkpoint.pt config.json evaluation.json metrics.csv".split()
    assert sorted(os.listdir(tmp_path)) == sorted([f"{f}.png" for f in figures.split()] + files)
    assert [line[:11] for line in log.splitlines() if line[:5] == "epoch"] == [
        "epoch   1/2",
        "epoch   2/2",
    ]
    rows = metrics(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and {r["objective"] for r in rows} == {"elbo"}
    for r in rows:  # beta 1, no free bits: the loss is the -ELBO
        assert float(r["train_loss"]) == pytest.approx(
            float(r["train_recon"]) + float(r["train_kl"])
        )
        assert float(r["test_neg_elbo"]) == pytest.approx(
            float(r["test_recon"]) + float(r["test_kl"])
        )
    results = json.loads((tmp_path / "evaluation.json").read_text())
    for key in ("test_neg_elbo", "test_recon", "test_kl"):  # the same weights and draws
        assert results[key] == float(rows[-1][key]) == history[-1][key], key
    assert list(results["recon_error_per_class"])[:2] == ["0 - zero", "1 - one"]
    by_variance = sorted(range(8), key=lambda d: -results["mu_var"][d])  # the active-unit measure
    assert [row.split()[0] for row in labels["traversals.png"][0]] == [f"z{d}" for d in by_variance]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["latent_dim"], config["channels"], config["image_size"]) == (8, 1, 28)
    state = torch.load(tmp_path / "checkpoint.pt")
    assert state["config"] == config and state["epoch"] == 2 and state["history"] == history
    assert set(state) >= {"model", "optimizer", "rng", "model_class", "model_args"}


def test_the_report_names_what_each_number_is(mnist_dir, tmp_path, capsys):
    extra = "--epochs 2 --nll_samples 2 --kl_warmup 4 --beta 0.5 --free_bits 5"
    history = vae.main(quick_run(mnist_dir, tmp_path / "grey", extra))
    out = capsys.readouterr().out
    note = "Bernoulli on pixels that are not binary: a cross-entropy that compares runs"
    assert note in next(line for line in out.splitlines() if line.startswith("test -ELBO"))
    assert note in next(line for line in out.splitlines() if line.startswith("test NLL (K=2)"))
    results = json.loads((tmp_path / "grey" / "evaluation.json").read_text())
    assert results["beta"] == 0.125 and "test_nll_bits_per_dim" not in results  # the last epoch's
    floored = sum(max(5.0, kl) for kl in results["kl_per_dim"])  # the loss it minimised
    assert results["test_loss"] == pytest.approx(results["test_recon"] + 0.125 * floored)
    assert f"at beta 0.125: {results['test_loss']:.3f}" in out
    last = history[-1]  # the floor raises the loss it minimised above recon + beta kl
    assert last["train_loss"] > last["train_recon"] + 0.125 * last["train_kl"] + 0.5
    vae.main(quick_run(mnist_dir, tmp_path / "binary", "--epochs 1 --binarize --nll_samples 2"))
    out = capsys.readouterr().out
    assert "test NLL (K=2)" in out and "bits/dim" in out and note not in out
    results = json.loads((tmp_path / "binary" / "evaluation.json").read_text())
    assert results["test_nll_bits_per_dim"] == pytest.approx(
        results["test_nll"] / (784 * math.log(2))
    )
    vae.main(
        quick_run(mnist_dir, tmp_path / "gauss", "--epochs 1 --likelihood gaussian --beta 300")
    )
    out = capsys.readouterr().out
    assert "a Gaussian density with sigma 0.1" in out and "bits/dim" not in out
    assert (
        "warning: the posterior has collapsed: the test KL is 0.0" in out
    )  # beta 300 on 320 images


def test_the_loss_curves_name_what_each_epoch_minimised(tmp_path, monkeypatch):
    figures, figure = [], vae.figure
    monkeypatch.setattr(vae, "figure", lambda *size: figures.append(figure(*size)) or figures[-1])
    row = dict(train_recon=1.0, train_kl=2.0, test_neg_elbo=3.5, test_recon=1.5, test_kl=2.0)
    history = [dict(row, epoch=e, beta=min(1, e / 2), objective="elbo") for e in (1, 2, 3)]
    history.append(dict(row, epoch=4, beta=1.0, objective="iwae5"))
    vae.plot_losses(history, tmp_path / "curves.png")
    title = "-ELBO = recon + KL\n(minimised: recon + beta KL from epoch 1, then -IWAE5 from epoch 4; beta 0.5 to 1)"
    assert figures[0].axes[0].get_title() == title
    train, test = (line.get_ydata().tolist() for line in figures[0].axes[0].get_lines())
    assert train == [3.0] * 4 and test == [3.5] * 4  # the -ELBO, whatever the run minimised


def test_torchvision_datasets_are_read_and_converted(mnist_dir, tmp_path, monkeypatch):
    data = vae.load_torchvision("mnist", mnist_dir)
    assert data["train_x"].shape == (320, 1, 28, 28) and data["train_x"].dtype == torch.uint8
    assert torch.equal(data["train_x"][:, 0], fake_digits(320, seed=0)[0])
    assert data["train_y"][:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    big = vae.load_torchvision("mnist", mnist_dir, image_size=32, channels=3)["test_x"]
    assert big.shape == (120, 3, 32, 32) and torch.equal(big[:, 0], big[:, 2])  # grey into RGB
    assert big.float().mean().item() == pytest.approx(
        data["test_x"].float().mean().item(), rel=0.02
    )
    # torchvision checks each CIFAR-10 file's md5: files written here pass with that check off
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:  # the file's (N, 3072) rows
            pickle.dump({"data": images.flatten(1).numpy(), "labels": list(range(6))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    grey = vae.load_torchvision("cifar10", str(tmp_path), channels=1)["test_x"]
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()).convert("L").tobytes() for im in images]
    pil = torch.tensor([list(b) for b in pil]).view(6, 1, 32, 32)
    assert (grey.int() - pil).abs().max() <= 1  # PIL's luma


def test_a_folder_of_images_in_any_8_bit_mode(tmp_path):
    write_image_folder(tmp_path / "split" / "train")
    write_image_folder(tmp_path / "split" / "val", ("stripes", "square"), per_class=2, seed=1)
    tall = torch.zeros(96, 32, 3, dtype=torch.uint8)  # red above, green in the middle, blue below
    tall[:32, :, 0] = 255
    tall[32:64, :, 1] = 255
    tall[64:, :, 2] = 255
    rgb = Image.fromarray(tall.numpy())
    for mode, ext in dict(
        RGBA="png", CMYK="jpg", L="png", LA="png", P="png", **{"1": "png"}
    ).items():
        rgb.convert(mode).save(tmp_path / "split" / "train" / "circle" / f"tall_{mode}.{ext}")
    data = vae.load_folder(str(tmp_path / "split"), 32, 3)
    assert data["classes"] == ["circle", "square", "stripes"]
    assert data["test_y"].tolist() == [1, 1, 2, 2]  # val/'s classes numbered as train/'s
    assert data["train_x"].shape == (30, 3, 32, 32) and data["test_x"].shape == (4, 3, 32, 32)
    assert data["train_y"].tolist() == [0] * 14 + [1] * 8 + [2] * 8
    tall_1, _, tall_l, _, _, tall_rgba = data["train_x"][8:14]  # sorted by name, after circle0_*
    assert tall_rgba[1].min() == 255 and tall_rgba[[0, 2]].max() == 0  # the centre square
    assert torch.equal(tall_l[0], tall_l[2]) and abs(tall_l.float().mean() - 0.587 * 255) < 2
    assert set(tall_1.unique().tolist()) <= {0, 255}
    write_image_folder(tmp_path / "flat", classes=None, per_class=10)
    flat = vae.load_folder(str(tmp_path / "flat"), 28, 1)
    assert flat["classes"] is None and flat["train_y"] is None
    assert flat["train_x"].shape == (27, 1, 28, 28) and flat["test_x"].shape == (3, 1, 28, 28)
    assert torch.equal(vae.load_folder(str(tmp_path / "flat"), 28, 1)["test_x"], flat["test_x"])
    seen = {bytes(x.flatten().tolist()) for x in flat["train_x"]}
    assert not any(bytes(x.flatten().tolist()) in seen for x in flat["test_x"])


def test_a_conditional_run_on_a_folder_draws_each_class(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "images", per_class=6)
    argv = ["--dataset", "folder", "--data_dir", folder, "--out_dir", tmp_path / "run"]
    small = "--image_size 32 --latent_dim 2 --width 4 --batch_size 8 --epochs 1 --device cpu"
    code, out, _ = run_main(argv + f"{small} --conditional --nll_samples 3".split(), capsys)
    written = set(os.listdir(tmp_path / "run"))
    assert code == 0 and "samples_per_class.png" in written and "samples.png" not in written
    assert "test -log p(x|y) (K=3)" in out
    state = torch.load(tmp_path / "run" / "checkpoint.pt")
    assert state["model_args"]["num_classes"] == 3 and state["config"]["classes"] == [
        "circle",
        "square",
        "stripes",
    ]


def test_resume_goes_on_bit_for_bit_and_may_change_the_objective(mnist_dir, tmp_path, capsys):
    vae.main(quick_run(mnist_dir, tmp_path / "a", "--epochs 3 --binarize"))  # random draws
    vae.main(quick_run(mnist_dir, tmp_path / "b", "--epochs 1 --binarize"))
    vae.main(["--resume", "--out_dir", str(tmp_path / "b"), "--epochs", "3"])
    a = metrics(tmp_path / "a" / "metrics.csv")
    assert [float(r["lr"]) for r in a] == pytest.approx([0.002, 0.0015, 0.0005])  # the cosine
    assert metrics(tmp_path / "b" / "metrics.csv") == a
    weights = [torch.load(tmp_path / d / "checkpoint.pt")["model"] for d in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    vae.main(["--resume", "--out_dir", str(tmp_path / "a"), "--epochs", "4", "--iwae_samples", "3"])
    assert "| train -IWAE3 " in capsys.readouterr().out
    assert [r["objective"] for r in metrics(tmp_path / "a" / "metrics.csv")] == ["elbo"] * 3 + [
        "iwae3"
    ]


def test_checkpoint_mode_writes_the_report_of_a_run_without_touching_it(trained, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    code, _, _ = run_main(["--checkpoint", trained / "checkpoint.pt", "--nll_samples", 20], capsys)
    assert (
        code == 0 and {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    )
    ran, evaluated = (
        json.loads((d / "evaluation.json").read_text()) for d in (trained, trained / "eval")
    )
    assert evaluated == ran  # the same data, weights and seed: bit for bit
    assert ran["test_nll"] < ran["test_neg_elbo"]  # K=20 is tighter than the ELBO
    assert (trained / "eval" / "samples.png").read_bytes() == (trained / "samples.png").read_bytes()
    assert not {"checkpoint.pt", "metrics.csv"} & set(os.listdir(trained / "eval"))


TORCHRUN = f"""
import os, sys, torch
sys.path.insert(0, {HERE!r})
import vae
built, build = [], vae.build
vae.build = lambda *args: built.append(build(*args)) or built[-1]
vae.main(sys.argv[1:])
torch.save(built[0][0].state_dict(), f"weights{{os.environ['RANK']}}.pt")
"""


def test_two_processes_train_any_objective_in_step(mnist_dir, tmp_path):
    (tmp_path / "two.py").write_text(TORCHRUN)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv = quick_run(mnist_dir, tmp_path / "run", "--epochs 1 --iwae_samples 2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [*run, "two.py", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cpu x 2" in r.stdout and r.stdout.count("epoch   1/1") == 1  # rank 0 speaks
    weights = [torch.load(tmp_path / f"weights{rank}.pt") for rank in (0, 1)]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt")["model"]
    for k in weights[0]:  # after an IWAE epoch on their own shares, the same weights
        assert torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], saved[k]), k
    assert metrics(tmp_path / "run" / "metrics.csv")[0]["objective"] == "iwae2"


def test_ctrl_c_stops_with_one_line_and_the_checkpoint_to_go_on_from(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    argv = [
        sys.executable,
        os.path.join(HERE, "vae.py"),
        *quick_run(mnist_dir, tmp_path, "--epochs 500"),
    ]
    # a child inherits SIGINT ignored from a shell's background job: the run gets the default back
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore
    )
    for line in proc.stdout:  # after epoch 1's log line, its checkpoint is being written
        if line.startswith("epoch   2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.count("\n") == 1, err
    assert re.fullmatch(
        r"vae.py: error: stopped by Ctrl-C; the checkpoint of epoch \d+, .* is intact; go on with: python vae.py --resume --out_dir .*\.\n",
        err,
    )
    assert torch.load(tmp_path / "checkpoint.pt")["epoch"] >= 1

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vae, "train_step", interrupt)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path / "new", "--epochs 1"), capsys)
    assert (
        code == 130
        and "no epoch had finished, so no checkpoint was written" in err
        and "--resume" not in err
    )
    monkeypatch.undo()
    monkeypatch.setattr(vae, "report", interrupt)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path / "report", "--epochs 1"), capsys)
    assert (
        code == 130
        and f"is intact; go on with: python vae.py --checkpoint {tmp_path / 'report' / 'checkpoint.pt'}."
        in err
    )


def test_a_failure_never_damages_the_checkpoint_already_written(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    save = torch.save

    def half_then_full_disk(obj, f):  # writes half a checkpoint, then the disk is full
        save(obj, f)
        with open(f, "r+b") as g:
            g.truncate(len(before) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        vae.main(["--resume", "--out_dir", str(tmp_path), "--epochs", "2"])
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()

    def blow_up(model, *args, **kwargs):  # as a far too large learning rate would leave them
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1e30)
        return step(model, *args, **kwargs)

    step = vae.train_step
    monkeypatch.setattr(vae, "train_step", blow_up)
    code, _, err = run_main(["--resume", "--out_dir", tmp_path, "--epochs", 2], capsys)
    assert code == 1 and "the loss became non-finite in epoch 2; the checkpoint of epoch 1" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [r["epoch"] for r in metrics(tmp_path / "metrics.csv")] == ["1"]


def test_overwrite_leaves_no_file_of_the_earlier_run(mnist_dir, trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("the user's own file")
    (tmp_path / "run" / "eval").mkdir(exist_ok=True)
    (tmp_path / "run" / "eval" / "evaluation.json").write_text("{}")
    vae.main(quick_run(mnist_dir, tmp_path / "run", "--epochs 1 --overwrite"))
    left = set(os.listdir(tmp_path / "run"))
    assert "reconstructions_epoch002.png" not in left and "notes.txt" in left
    assert "test_nll" not in json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert os.listdir(tmp_path / "run" / "eval") == []


def test_help_shows_each_flag_with_its_range_and_default():
    text = " ".join(vae.build_parser().format_help().split())  # argparse wraps anywhere
    assert "--latent_dim LATENT_DIM 2 to 4096 (default: 32)" in text
    assert "--epochs EPOCHS 1 to 100000 (default: 30)" in text and "(default: None)" not in text


def test_importing_vae_does_nothing(tmp_path):
    # nor loads what only the tool needs, which would double the time `import vae` takes
    code = "import sys, vae; assert not {'torchvision', 'matplotlib', 'PIL'} & set(sys.modules)"
    env = dict(os.environ, PYTHONPATH=HERE)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True)
    assert r.returncode == 0 and r.stdout == r.stderr == b"" and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# The mistakes users make: one sentence each, and no file changed


def folder_mistake(setup, d):
    """Make in folder d the image folder that `setup` names; returns the argv that reads it."""
    d.mkdir()
    if setup == "folder flat":
        write_image_folder(d, classes=None, per_class=3)
    elif setup == "folder empty class":
        write_image_folder(d, classes=("a",), per_class=3)
        (d / "b").mkdir()
    elif setup == "folder 16 bits":
        Image.new("I;16", (20, 30)).save(d / "deep.png")
    elif setup == "folder conditional":  # a conditional run on three classes, given two
        three = write_image_folder(d / "three", per_class=7)  # 2 test images
        small = "--image_size 32 --latent_dim 2 --width 4 --epochs 1 --device cpu --conditional"
        vae.main(
            ["--dataset", "folder", "--data_dir", str(three), "--out_dir", str(d / "run")]
            + small.split()
        )
        two = write_image_folder(d / "two", classes=("a", "b"), per_class=3)
        return ["--checkpoint", d / "run" / "checkpoint.pt", "--data_dir", two]
    return ["--dataset", "folder", "--data_dir", d, "--image_size", 32]


def mistake(setup, d, trained, monkeypatch):
    """Make in folder d the mistake that `setup` names; returns the argv that meets it."""
    if setup.startswith("offline"):  # a closed local port as the proxy: a download fails at once
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
        d.mkdir()
        if setup == "offline damaged":
            path = write_small_mnist(d) / "train-images-idx3-ubyte"
            path.write_bytes(path.read_bytes()[:1000])
        return ["--data_dir", d]
    if setup.startswith("folder"):
        return folder_mistake(setup, d)
    shutil.copytree(trained, d)
    ckpt = d / "checkpoint.pt"
    if setup == "run text":
        ckpt.write_text("not a checkpoint\n")
    elif setup == "run pickle":
        torch.save(dict(torch.load(ckpt), payload=os.getcwd), ckpt)  # code that loading would run
    elif setup == "run save_model":
        vae.save_model(vae.MLPVAE(), ckpt)
    elif setup == "run two processes":
        monkeypatch.setattr(vae, "join_processes", lambda device: (0, 2, device))
    return ["--data_dir", json.loads((d / "config.json").read_text())["data_dir"]]


@pytest.mark.parametrize(
    "setup, argv, sentence",
    [
        ("offline", "", "MNIST could not be read from '{d}/MNIST/raw' nor downloaded ("),
        ("offline", "--dataset cifar10", "put its files there: cifar-10-python.tar.gz"),
        ("offline damaged", "", "put its files there: train-images-idx3-ubyte.gz, "),
        ("folder", "--data_dir {d}/none", "--data_dir '{d}/none' is not a folder"),
        ("folder", "", "'{d}' has no images for a train split"),
        ("folder empty class", "", "'{d}': Found no valid file for the classes b"),
        ("folder 16 bits", "", "'{d}/deep.png' has pixels of more than 8 bits (mode I;16)"),
        ("folder flat", "--conditional", "--conditional needs class labels"),
        ("folder conditional", "", "the model is conditional on 3 classes, the data has 2"),
        ("run", "--out_dir {d}", "'{d}' holds a run: --resume it, --overwrite it"),
        ("run", "--out_dir {d}/checkpoint.pt/x", "cannot make --out_dir '{d}/checkpoint.pt/x'"),
        ("run", "--checkpoint {d}/checkpoint.pt --out_dir {d}", "holds a run; give --checkpoint"),
        (
            "run",
            "--resume --out_dir {d}/none",
            "there is no checkpoint at '{d}/none/checkpoint.pt'",
        ),
        ("run", "--resume --out_dir {d}", "the run in '{d}' is finished; give --epochs above 2"),
        ("run text", "--checkpoint {d}/checkpoint.pt", "is not a checkpoint of vae.py ("),
        (
            "run pickle",
            "--checkpoint {d}/checkpoint.pt",
            "is not a checkpoint of vae.py (Weights only",
        ),
        (
            "run save_model",
            "--checkpoint {d}/checkpoint.pt",
            "holds a model of save_model, not a run",
        ),
        (
            "run two processes",
            "--out_dir {d}/new --batch_size 63",
            "--batch_size 63 is shared by 2",
        ),
        (
            "",
            "--device cuda" if not torch.cuda.is_available() else "--device mps",
            "is not available here",
        ),
        ("", "--epochs 0", "argument --epochs: expected 1 to 100000, got 0"),
        ("", "--lr nan", "argument --lr: expected 1e-08 to 10.0, got nan"),
        ("", "--seed 1e20", "argument --seed: invalid 0 to 4294967295 value: '1e20'"),
        ("", "--image_size 30", "invalid choice: 30 (choose from 28, 32, 64, 128)"),
        ("", "--epoch 40", "unrecognized arguments: --epoch 40"),  # no abbreviations
        (
            "",
            "--resume --overwrite",
            "--resume continues the run in --out_dir: not with --overwrite",
        ),
        ("", "--dataset folder", "--dataset folder needs --data_dir"),
        ("", "--iwae_samples 5 --beta 0.5", "the IWAE bound (--iwae_samples) has no --beta"),
    ],
)
def test_a_mistake_is_one_sentence_and_changes_nothing(
    trained, tmp_path, monkeypatch, capsys, setup, argv, sentence
):
    monkeypatch.chdir(tmp_path)  # the default --out_dir, runs/conv, would be made here
    d = tmp_path / "data"
    extra = mistake(setup, d, trained, monkeypatch) if setup else []
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run_main([*extra, *argv.format(d=d).split()], capsys)
    lines = err.strip().splitlines()  # one sentence; from argparse, after its usage line
    assert lines[-1].startswith("vae.py: error: ") and sentence.format(d=d) in lines[-1], err
    assert "Traceback" not in err and (len(lines) == 1 or lines[0].startswith("usage: "))
    assert code == (2 if lines[0].startswith("usage: ") else 1)  # argparse's, or ours
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "runs").exists()
