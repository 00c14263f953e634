"""Tests for vae.py, in two parts like the file. First the specification of the VAE (Part 1): the
maths directly (the reparameterization's gradients and draws, the KL and the likelihoods against
torch.distributions, the exact log p(x) of a linear-Gaussian model), a learning test, and Part 1
copied alone into a copier's own loop. Then the tool (Part 2), on small data the tests write: a run
and every file, the loaders, resume, checkpoint mode, torchrun, the stops, and the table of
mistakes. Run with `python -m pytest -q`; a GPU is used where present."""

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
    c = model.channels
    s = model.image_size
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
    assert vae.MLPVAE(latent_dim=2).to(torch.bfloat16).sample(2).dtype == torch.bfloat16
    assert samples.min() >= 0 and samples.max() <= 1


def test_conv_depth_follows_image_size_and_its_defaults_are_the_command_lines():
    assert vae.ConvVAE(image_size=28).feature_shape == (64, 7, 7)
    assert vae.ConvVAE(image_size=32).feature_shape == (128, 4, 4)
    assert vae.ConvVAE(image_size=64).feature_shape == (256, 4, 4)
    blocks = [m for m in vae.ConvVAE().modules() if isinstance(m, vae.ResidualBlock)]
    assert len(blocks) == 2 and all(b.f[0].in_channels == 64 for b in blocks)  # one a side, 7x7
    config = vae.build_parser().parse_args([])  # the command line's defaults, on MNIST
    config.image_size = 28
    config.channels = 1
    assert vae.build_model(config, 0).model_args == vae.ConvVAE().model_args
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
def test_one_rule_for_labels_in_every_function(cls):
    torch.manual_seed(0)
    model = cls(image_size=32, channels=3, latent_dim=6, num_classes=4).eval()
    x = torch.rand(5, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0])
    logits, mu, logvar = model(x, y)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (5, 6)
    assert model.fc_mu.in_features == model.encoder(x).shape[1] + 4
    for same in (y.int(), y.float(), F.one_hot(y, 4).float()):  # indices of any dtype, one-hot
        torch.testing.assert_close(model.encode(x, same)[0], mu)
    torch.testing.assert_close(model.encode(x, 2)[0], model.encode(x, torch.full((5,), 2))[0])
    assert model.sample(10, y=3).shape == (10, 3, 32, 32)  # an int: one class for all
    torch.testing.assert_close(
        vae.log_likelihood(model, x, 3, 2), vae.log_likelihood(model, x, 3, y * 0 + 2)
    )
    with pytest.raises(ValueError, match="needs the class labels y"):
        model.encode(x)
    z = torch.randn(1, 6).repeat(4, 1)
    images = model.decode(z, torch.arange(4))  # one z, four labels
    assert all((images[i] - images[0]).abs().mean() > 1e-3 for i in range(1, 4))
    assert (model.encode(x, (y + 1) % 4)[0] - mu).abs().max() > 1e-4
    plain = cls(image_size=32, channels=3, latent_dim=6)
    for call in (
        lambda: plain(x, y),
        lambda: plain.sample(2, y=1),
        lambda: vae.interpolate(plain, x[0], x[1], y_a=0, y_b=1),
        lambda: vae.train_step(plain, torch.optim.SGD(plain.parameters()), x, y),
    ):
        with pytest.raises(ValueError, match="unconditional .* takes no labels y"):
            call()


@pytest.mark.parametrize("cls", [vae.ConvVAE, vae.MLPVAE])
def test_the_forward_pass_exports_and_checks_no_values(cls):
    model = cls(latent_dim=4).eval()
    x = torch.rand(2, 1, 28, 28)
    exported = torch.export.export(model, (x,))  # no branch on the data's values in forward
    assert exported.module()(x)[0].shape == x.shape
    model(x * 255)  # the forward pass checks nothing; the functions a dataset enters do
    optimizer = torch.optim.SGD(model.parameters())
    for call in (
        lambda x: vae.train_epoch(model, optimizer, x),
        lambda x: vae.evaluate(model, x),
        lambda x: vae.log_likelihood(model, x, 2),
    ):
        for bad, says in ((x * 255, r"to 25\d"), (x - 0.5, r"from -0\.4")):
            with pytest.raises(
                ValueError, match=rf"floats in \[0, 1\], got torch.float32 .*{says}"
            ):
                call(bad)
        call((x * 255).to(torch.uint8))  # uint8, and floats in [0, 1]: no error
        call(x)


# ----------------------------------------------------------------------------
# The specification: the maths, checked against torch.distributions and by hand


def test_z_is_differentiable_in_mu_and_logvar_and_drawn_from_q_or_for_samples_the_prior():
    mu = torch.full((1000, 20), 2.0, requires_grad=True)
    logvar = torch.full((1000, 20), math.log(0.25), requires_grad=True)
    model = vae.MLPVAE(latent_dim=20)
    torch.manual_seed(3)
    z = model.reparameterize(mu, logvar)
    torch.manual_seed(3)
    eps = torch.randn(1000, 20)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))  # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * 0.5 * eps)  # dz/dlogvar = sigma * eps / 2
    assert abs(z.mean() - 2) < 0.01 and abs(z.std() - 0.5) < 0.01  # N(mu, sigma^2)
    model.decode = lambda z, y=None: z  # what sample decodes
    z = model.sample(40000, generator=torch.Generator().manual_seed(0))
    assert z.mean(0).abs().max() < 0.02 and (z.std(0) - 1).abs().max() < 0.02
    assert (torch.corrcoef(z.T) - torch.eye(20)).abs().max() < 0.03  # N(0, I): independent


def test_kl_matches_torch_distributions_in_float32_under_autocast():
    torch.manual_seed(0)
    mu = torch.randn(16, 10) * 2
    logvar = torch.randn(16, 10)
    expected = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    zeros = torch.zeros(4, 6)  # 0 at the prior, positive elsewhere
    assert torch.equal(vae.kl_divergence(zeros, zeros), torch.zeros(4))
    assert (vae.kl_divergence(zeros + 0.5, zeros) > 0).all()
    assert (vae.kl_divergence(zeros, zeros - 1) > 0).all()
    model = vae.MLPVAE(latent_dim=4)
    x = torch.rand(8, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, mu, logvar = model(x)
        loss, rec, kl = vae.vae_loss(logits, x, mu, logvar)
    assert mu.dtype == torch.bfloat16 and loss.dtype == rec.dtype == kl.dtype == torch.float32


def test_bernoulli_reconstruction_is_the_bernoulli_log_likelihood_from_stable_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 28, 28) * 3
    x = torch.rand(4, 1, 28, 28)
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
    logits = torch.randn(4, 3, 8, 8)
    x = torch.rand(4, 3, 8, 8)
    nll = -Normal(torch.sigmoid(logits), sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(vae.reconstruction_loss(logits, x, "gaussian", sigma), nll)


def test_loss_parts_add_up_and_beta_scales_only_the_kl():
    torch.manual_seed(0)
    logits = torch.randn(8, 1, 28, 28)
    x = torch.rand(8, 1, 28, 28)
    mu = torch.randn(8, 5)
    logvar = torch.randn(8, 5)
    _, rec1, kl1 = vae.vae_loss(logits, x, mu, logvar, beta=1.0)
    for beta in (0.0, 0.5, 4.0):
        loss, rec, kl = vae.vae_loss(logits, x, mu, logvar, beta=beta)
        torch.testing.assert_close(loss, rec + beta * kl)
        assert torch.equal(rec, rec1) and torch.equal(kl, kl1)
    # each part is a batch mean of the per-image values, in nats per image; uint8 as its floats
    torch.testing.assert_close(rec1, vae.reconstruction_loss(logits, x).mean())
    torch.testing.assert_close(kl1, vae.kl_divergence(mu, logvar).mean())
    x8 = (x * 255).round().to(torch.uint8)
    rec8 = vae.vae_loss(logits, x8, mu, logvar)[1]
    assert torch.equal(rec8, vae.vae_loss(logits, x8 / 255, mu, logvar)[1])


def test_free_bits_change_the_gradient_only_under_the_floor():
    torch.manual_seed(0)
    logits = torch.randn(16, 1, 4, 4)
    x = torch.rand(16, 1, 4, 4)
    mu = torch.cat([torch.randn(16, 2) * 2, torch.randn(16, 2) * 0.05], dim=1)  # 2, 3 near 0
    logvar = torch.cat([torch.full((16, 2), -2.0), torch.full((16, 2), -0.01)], dim=1)
    kl_dims = vae.kl_per_dimension(mu, logvar).mean(0)
    floor = 0.5
    assert (kl_dims[:2] > floor).all() and (kl_dims[2:] < floor).all()
    grads = {}
    for fb in (0.0, floor):
        m = mu.clone().requires_grad_()
        lv = logvar.clone().requires_grad_()
        loss, rec, kl = vae.vae_loss(logits, x, m, lv, free_bits=fb)
        loss.backward()
        grads[fb] = (m.grad, lv.grad, loss.item(), kl.item())
    (gm0, glv0, loss0, kl0) = grads[0.0]
    (gm1, glv1, loss1, kl1) = grads[floor]
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


@pytest.mark.parametrize("model", [vae.ConvVAE(latent_dim=8), vae.MLPVAE(latent_dim=8)])
def test_every_parameter_gets_a_gradient_and_the_encoder_one_through_the_reconstruction(model):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    logits, mu, logvar = model(x)
    vae.vae_loss(logits, x, mu, logvar)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.zero_grad()
    logits, mu, logvar = model(x)
    vae.vae_loss(logits, x, mu, logvar, beta=0.0)[0].backward()  # no KL: z's path alone
    assert model.fc_mu.weight.grad.abs().sum() > 0 and model.fc_logvar.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------
# The specification: a training step, the schedules, and learning


def test_train_step_clips_reports_the_norm_and_refuses_what_it_would_ignore():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(16,)).eval()  # as load_model returns it
    x = torch.rand(8, 1, 28, 28)
    stats = vae.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, grad_clip=1e-3)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert stats["grad_norm"].item() > 1e-3 and clipped.item() == pytest.approx(1e-3, rel=1e-3)
    assert model.training  # BatchNorm learns again after load_model
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters())
    ignored = [dict(iwae_samples=3, beta=0.5), dict(iwae_samples=3, free_bits=0.1)]
    for kwargs in [dict(beta=-1.0), dict(free_bits=-0.5)] + ignored:
        with pytest.raises(ValueError, match="train_step needs beta >= 0 and free_bits >= 0"):
            vae.train_step(model, optimizer, x, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_schedules_at_their_ends():
    betas = [vae.beta_schedule(e, 0.5, kl_warmup=4) for e in range(1, 8)]
    assert betas == [0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]  # 0 at epoch 1, beta at 5
    assert [vae.beta_schedule(e, 2.0) for e in (1, 5)] == [2.0, 2.0]
    for epoch, beta, warmup in ((0, 1.0, 3), (1, -0.5, 0), (2, 1.0, -1)):
        with pytest.raises(ValueError, match="epochs count from 1"):
            vae.beta_schedule(epoch, beta, warmup)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.002)
    scheduler = vae.cosine_decay(optimizer, epochs=4)
    lrs = []
    for _ in range(7):  # an epoch, then the scheduler's step; three steps past its end
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.002, 0.001 * (1 + math.sqrt(0.5)), 0.001, 0.001 * (1 - math.sqrt(0.5)), 0, 0, 0]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-18)  # at 0 past its end, no rise
    resumed = vae.cosine_decay(optimizer, epochs=8, last_epoch=1)  # after epoch 2, now of 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * (1 + math.cos(math.pi / 4)))
    assert resumed.last_epoch == 2


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


def test_log_likelihood_uses_the_likelihood_it_is_given_and_one_hot_labels():
    torch.manual_seed(0)
    model = vae.MLPVAE(latent_dim=3, hidden=(32,), num_classes=4)
    x = vae.to_float(images_of(6, seed=3))
    y = torch.tensor([0, 1, 2, 3, 0, 1])

    def normal(logits, target):  # the same likelihood, written with torch.distributions
        return Normal(torch.sigmoid(logits), 0.1).log_prob(target).flatten(1).sum(1)

    estimate = functools.partial(vae.log_likelihood, model, x, 7, max_decodes=12)  # 2 per chunk
    ours = estimate(y, "gaussian", 0.1)
    torch.testing.assert_close(ours, estimate(y, likelihood=normal))
    assert torch.equal(ours, estimate(F.one_hot(y, 4).float(), "gaussian", 0.1))
    assert not torch.allclose(ours, estimate(y))  # the Bernoulli


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
        self.A = cov @ self.W.T / s**2
        self.cov = cov

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
    x_a = torch.rand(1, 28, 28)
    x_b = torch.rand(1, 28, 28)
    path = vae.interpolate(model, x_a, x_b, steps=7)
    assert path.shape == (7, 1, 28, 28)
    assert torch.equal(vae.interpolate(model, x_a[None], x_b[None], steps=7), path)  # (1, C, H, W)
    with pytest.raises(ValueError, match="single images"):
        vae.interpolate(model, torch.rand(2, 1, 28, 28), x_b)
    x_hat = vae.reconstruct(model, torch.stack([x_a, x_b]))
    with torch.no_grad():
        mu = model.eval().encode(torch.stack([x_a, x_b]))[0]
        ends = model.decode(mu)
        middle = model.decode(mu.mean(0, keepdim=True))
    assert torch.equal(x_hat, ends)
    torch.testing.assert_close(path[0], ends[0])
    torch.testing.assert_close(path[-1], ends[1])
    torch.testing.assert_close(path[3], middle[0])  # the straight line between the means


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
from myvae import ConvVAE, evaluate, load_model, save_model, train_step

class MyVAE(ConvVAE):  # a copier's own model, with an argument of its own
    def __init__(self, note="", **kwargs):
        super().__init__(**kwargs)
        self.model_args.update(note=note)

torch.manual_seed(0)
images = torch.load("images.pt")  # (256, 1, 28, 28) uint8
loader = torch.utils.data.DataLoader(images, batch_size=32, shuffle=True)
model = MyVAE(note="mine", latent_dim=8)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
compiled = torch.compile(model, backend="eager")
test = []
for epoch in range(4):
    for x in loader:
        train_step(compiled, optimizer, x)
    test.append(evaluate(model, images)["neg_elbo"])
    scheduler.step()
save_model(compiled, "model.pt", optimizer=optimizer.state_dict())
errors = []
torch.save(model.state_dict(), "weights.pt")  # the likeliest other file
for file in ("model.pt", "weights.pt"):
    try:
        load_model(file)
    except ValueError as e:
        errors.append(str(e))
loaded = load_model("model.pt", cls=MyVAE)
same = evaluate(loaded, images) == evaluate(model, images)
optimizer = torch.optim.Adam(loaded.parameters())
optimizer.load_state_dict(torch.load("model.pt")["optimizer"])
running = loaded.encoder[1].running_mean.clone()
train_step(loaded, optimizer, images[:32])  # goes on training the loaded model
print(json.dumps(dict(
    test=test, errors=errors, same=same, args=loaded.model_args, keys=list(torch.load("model.pt")["model"]),
    moved=not torch.equal(running, loaded.encoder[1].running_mean),
    imported=sorted({"torchvision", "PIL", "matplotlib", "tqdm"} & set(sys.modules)))))
"""


def test_part_one_copied_alone_serves_a_copiers_own_loop(tmp_path):
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
    assert out["test"][-1] < 0.8 * out["test"][0], out["test"]  # it learned
    no_class, state_dict = out["errors"]
    assert "holds a MyVAE" in no_class and "load_model(file, cls=MyVAE)" in no_class
    assert "was not written by save_model; for a plain state_dict" in state_dict
    assert out["same"] and out["args"]["note"] == "mine" and out["imported"] == []
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in out["keys"])  # the model inside
    assert out["moved"]  # train_step trains in train mode: BatchNorm's statistics move


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
        print(e.code if isinstance(e.code, str) else "", file=sys.stderr, end="")
    out, err = capsys.readouterr()
    return code, out, err


def metrics(path):
    """metrics.csv's rows, numbers as floats, without the timing columns."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    timing = ("train_seconds", "images_per_sec")
    number = lambda k, v: v if k == "objective" else float(v)  # noqa: E731
    return [{k: number(k, v) for k, v in row.items() if k not in timing} for row in rows]


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
            Image.fromarray(img.to(torch.uint8).numpy()).save(folder / f"{name}{c}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """The folder of a finished two-epoch MLP run."""
    out = tmp_path_factory.mktemp("trained") / "run"
    vae.main(quick_run(mnist_dir, out, "--epochs 2 --binarize --nll_samples 20"))
    return out


def test_a_run_writes_every_file_and_its_numbers_agree(mnist_dir, tmp_path, monkeypatch, capsys):
    labels = {}
    save_grid = vae.save_grid

    def keep_labels(rows, path, title, *row_and_col_labels):
        labels[os.path.basename(path)] = row_and_col_labels
        save_grid(rows, path, title, *row_and_col_labels)

    monkeypatch.setattr(vae, "save_grid", keep_labels)
    history = vae.main(quick_run(mnist_dir, tmp_path, "--model conv --epochs 2 --latent_dim 8"))
    log = [line[:11] for line in capsys.readouterr().out.splitlines() if line[:5] == "epoch"]
    figures = "best_worst class_means interpolation latent_distribution latent_pca loss_curves "
    figures += "reconstructions_epoch001 reconstructions_epoch002 samples traversals"
    files = [f"{f}.png" for f in figures.split()] + ["checkpoint.pt", "config.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["evaluation.json", "metrics.csv"])
    rows = metrics(tmp_path / "metrics.csv")
    assert log == ["epoch   1/2", "epoch   2/2"] and [r["epoch"] for r in rows] == [1, 2]
    for r in rows:  # beta 1, no free bits: the loss is the -ELBO
        assert r["train_loss"] == pytest.approx(r["train_recon"] + r["train_kl"])
        assert r["test_neg_elbo"] == pytest.approx(r["test_recon"] + r["test_kl"])
    results = json.loads((tmp_path / "evaluation.json").read_text())
    for key in ("test_neg_elbo", "test_recon", "test_kl"):  # the same weights and draws
        assert results[key] == rows[-1][key] == history[-1][key], key
    assert list(results["recon_error_per_class"])[:2] == ["0 - zero", "1 - one"]
    by_variance = sorted(range(8), key=lambda d: -results["mu_var"][d])  # the active-unit measure
    assert [row.split()[0] for row in labels["traversals.png"][0]] == [f"z{d}" for d in by_variance]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["latent_dim"], config["channels"], config["image_size"]) == (8, 1, 28)
    state = torch.load(tmp_path / "checkpoint.pt")
    assert state["config"] == config and state["epoch"] == 2 and state["history"] == history
    assert set(state) >= {"model", "optimizer", "rng", "model_class", "model_args"}
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "samples.png").write_text("an earlier evaluation's")
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1 --overwrite"))  # no earlier file is left
    left = set(os.listdir(tmp_path))
    assert "reconstructions_epoch002.png" not in left and "notes.txt" in left
    assert os.listdir(tmp_path / "eval") == []


def test_the_report_names_what_each_number_is(mnist_dir, tmp_path, capsys):
    extra = "--epochs 2 --nll_samples 2 --kl_warmup 4 --beta 0.5 --free_bits 5"
    history = vae.main(quick_run(mnist_dir, tmp_path / "grey", extra + " --lr_schedule constant"))
    assert [row["lr"] for row in history] == [0.002, 0.002]
    out = capsys.readouterr().out.splitlines()
    note = "Bernoulli on pixels that are not binary: a cross-entropy that compares runs"
    assert all(note in line for line in out if line.startswith(("test -ELBO", "test NLL (K=2)")))
    results = json.loads((tmp_path / "grey" / "evaluation.json").read_text())
    assert results["beta"] == 0.125 and "test_nll_bits_per_dim" not in results  # the last epoch's
    floored = sum(max(5.0, kl) for kl in results["kl_per_dim"])  # the loss it minimised
    assert results["test_loss"] == pytest.approx(results["test_recon"] + 0.125 * floored)
    assert f"minimised it (beta 0.125): {results['test_loss']:.3f}" in out[-2]
    last = history[-1]  # the floor raises the loss it minimised above recon + beta kl
    assert last["train_loss"] > last["train_recon"] + 0.125 * last["train_kl"] + 0.5
    vae.main(quick_run(mnist_dir, tmp_path / "binary", "--epochs 1 --binarize --nll_samples 2"))
    out = capsys.readouterr().out
    assert "test NLL (K=2)" in out and "bits/dim" in out and note not in out
    results = json.loads((tmp_path / "binary" / "evaluation.json").read_text())
    bits = results["test_nll"] / (784 * math.log(2))
    assert results["test_nll_bits_per_dim"] == pytest.approx(bits)
    extra = "--epochs 1 --likelihood gaussian --beta 300"  # beta 300: a collapse
    vae.main(quick_run(mnist_dir, tmp_path / "gauss", extra))
    out = capsys.readouterr().out
    assert "a Gaussian density with sigma 0.1" in out and "bits/dim" not in out
    assert "warning: the posterior has collapsed: the test KL is 0.0" in out


def test_torchvision_datasets_are_read_and_converted(mnist_dir, tmp_path, monkeypatch):
    data = vae.load_torchvision("mnist", mnist_dir)
    assert data["train_x"].shape == (320, 1, 28, 28) and data["train_x"].dtype == torch.uint8
    assert torch.equal(data["train_x"][:, 0], fake_digits(320, seed=0)[0])
    assert data["train_y"][:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    big = vae.load_torchvision("mnist", mnist_dir, image_size=32, channels=3)["test_x"]
    assert big.shape == (120, 3, 32, 32) and torch.equal(big[:, 0], big[:, 2])  # grey into RGB
    assert abs(big.float().mean() - data["test_x"].float().mean()) < 1  # antialiased
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


def test_a_folder_of_images_in_any_8_bit_mode_and_a_conditional_run_on_it(tmp_path, capsys):
    write_image_folder(tmp_path / "split" / "train")
    write_image_folder(tmp_path / "split" / "val", ("stripes", "square"), per_class=2, seed=1)
    tall = torch.zeros(96, 32, 3, dtype=torch.uint8)  # red above, green in the middle, blue below
    tall[:32, :, 0] = 255
    tall[32:64, :, 1] = 255
    tall[64:, :, 2] = 255
    circles = tmp_path / "split" / "train" / "circle"
    for mode in ("1", "CMYK", "L", "LA", "P", "RGBA"):  # grey, palette, colour, with alpha
        ext = "jpg" if mode == "CMYK" else "png"
        Image.fromarray(tall.numpy()).convert(mode).save(circles / f"tall_{mode}.{ext}")
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
    small = "--image_size 32 --latent_dim 2 --width 4 --batch_size 8 --epochs 1 --device cpu"
    argv = ["--dataset", "folder", "--data_dir", tmp_path / "split", "--out_dir", tmp_path / "run"]
    code, out, _ = run_main(argv + f"{small} --conditional --nll_samples 3".split(), capsys)
    written = set(os.listdir(tmp_path / "run"))
    assert code == 0 and "samples_per_class.png" in written and "samples.png" not in written
    assert "test -log p(x|y) (K=3)" in out
    assert torch.load(tmp_path / "run" / "checkpoint.pt")["model_args"]["num_classes"] == 3


def test_resume_goes_on_bit_for_bit_and_may_change_the_objective(mnist_dir, tmp_path, monkeypatch):
    vae.main(quick_run(mnist_dir, tmp_path / "a", "--epochs 3 --binarize"))  # random draws
    vae.main(quick_run(mnist_dir, tmp_path / "b", "--epochs 1 --binarize"))
    vae.main(["--resume", "--out_dir", str(tmp_path / "b"), "--epochs", "3"])
    a = metrics(tmp_path / "a" / "metrics.csv")
    assert [r["lr"] for r in a] == pytest.approx([0.002, 0.0015, 0.0005])  # the cosine
    assert metrics(tmp_path / "b" / "metrics.csv") == a
    weights = [torch.load(tmp_path / d / "checkpoint.pt")["model"] for d in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    figures = []  # the loss curves' title says what each epoch minimised
    figure = vae.figure
    monkeypatch.setattr(vae, "figure", lambda *size: figures.append(figure(*size)) or figures[-1])
    vae.main(["--resume", "--out_dir", str(tmp_path / "a"), "--epochs", "4", "--iwae_samples", "3"])
    rows = metrics(tmp_path / "a" / "metrics.csv")
    assert [r["objective"] for r in rows] == ["elbo", "elbo", "elbo", "iwae3"]
    results = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert results["test_loss"] < results["test_neg_elbo"]  # minus the tighter IWAE-3 bound
    curves = next(f.axes[0] for f in figures if f.axes[0].get_title().startswith("-ELBO"))
    minimised = "recon + beta KL from epoch 1, then -IWAE3 from epoch 4; beta 1"
    assert curves.get_title() == f"-ELBO = recon + KL\n(minimised: {minimised})"
    neg_elbo = [r["train_recon"] + r["train_kl"] for r in rows]
    assert curves.get_lines()[0].get_ydata().tolist() == pytest.approx(neg_elbo)  # not the loss


def test_checkpoint_mode_writes_the_report_of_a_run_without_touching_it(trained, capsys):
    files = lambda: {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}  # noqa: E731
    before = files()
    code, _, _ = run_main(["--checkpoint", trained / "checkpoint.pt", "--nll_samples", 20], capsys)
    assert code == 0 and files() == before
    ran = json.loads((trained / "evaluation.json").read_text())
    assert (
        json.loads((trained / "eval" / "evaluation.json").read_text()) == ran
    )  # the same data, weights and seed: bit for bit
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
    argv = [*run, "two.py", *quick_run(mnist_dir, tmp_path / "run", "--epochs 1 --iwae_samples 2")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cpu x 2" in r.stdout and r.stdout.count("epoch   1/1") == 1  # rank 0 speaks
    weights = [torch.load(tmp_path / f"weights{rank}.pt") for rank in (0, 1)]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt")["model"]
    for k in weights[0]:  # after an IWAE epoch on their own shares, the same weights
        assert torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], saved[k]), k
    assert metrics(tmp_path / "run" / "metrics.csv")[0]["objective"] == "iwae2"


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_to_go_on_from(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    argv = [sys.executable, os.path.join(HERE, "vae.py")]
    argv += quick_run(mnist_dir, tmp_path, "--epochs 500")
    # a child inherits SIGINT ignored from a shell's background job: the run gets the default back
    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    pipe = subprocess.PIPE
    proc = subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True, preexec_fn=default)
    next(line for line in proc.stdout if line.startswith("epoch   2/"))  # epoch 1 is saved
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    resume = rf"is intact; go on with: python vae.py --resume --out_dir {tmp_path}\.\n"
    assert proc.returncode == 130 and re.fullmatch(
        rf"vae.py: error: stopped by Ctrl-C; .*{resume}", err
    )
    assert torch.load(tmp_path / "checkpoint.pt")["epoch"] >= 1
    monkeypatch.setattr(vae, "train_step", interrupt)
    code, _, err = run_main(quick_run(mnist_dir, tmp_path / "new", "--epochs 1"), capsys)
    assert code == 130 and "Ctrl-C; no epoch had finished, so no checkpoint was written." in err
    monkeypatch.undo()
    monkeypatch.setattr(vae, "report", interrupt)  # training has finished: the report's command
    code, _, err = run_main(quick_run(mnist_dir, tmp_path / "last", "--epochs 1"), capsys)
    checkpoint = tmp_path / "last" / "checkpoint.pt"
    assert code == 130 and f"intact; go on with: python vae.py --checkpoint {checkpoint}." in err


def test_a_failure_never_damages_the_checkpoint_already_written(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    vae.main(quick_run(mnist_dir, tmp_path, "--epochs 1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    save = torch.save
    step = vae.train_step

    def half_then_full_disk(obj, f):  # writes half a checkpoint, then the disk is full
        save(obj, f)
        os.truncate(f, len(before) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):  # Python's own error, and traceback
        vae.main(["--resume", "--out_dir", str(tmp_path), "--epochs", "2"])
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()

    def blow_up(model, *args, **kwargs):  # as a far too large learning rate would leave them
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1e30)
        return step(model, *args, **kwargs)

    monkeypatch.setattr(vae, "train_step", blow_up)
    code, _, err = run_main(["--resume", "--out_dir", tmp_path, "--epochs", 2], capsys)
    assert code == 1 and "the loss became non-finite in epoch 2; the checkpoint of epoch 1" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [r["epoch"] for r in metrics(tmp_path / "metrics.csv")] == [1]


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
        argv = ["--dataset", "folder", "--data_dir", str(three), "--out_dir", str(d / "run")]
        vae.main(argv + small.split())
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


CHECKPOINT = "--checkpoint {d}/checkpoint.pt"
NO_DEVICE = "--device cuda" if not torch.cuda.is_available() else "--device mps"


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
        ("run", CHECKPOINT + " --out_dir {d}", "holds a run; give --checkpoint"),
        ("run", "--resume --out_dir {d}/none", "no checkpoint at '{d}/none/checkpoint.pt'"),
        ("run", "--resume --out_dir {d}", "the run in '{d}' is finished; give --epochs above 2"),
        ("run text", CHECKPOINT, "is not a checkpoint of vae.py ("),
        ("run pickle", CHECKPOINT, "is not a checkpoint of vae.py (Weights only"),
        ("run save_model", CHECKPOINT, "holds a model of save_model, not a run"),
        ("run two processes", "--out_dir {d}/new --batch_size 63", "63 is shared by 2 processes"),
        ("", NO_DEVICE, "is not available here"),
        ("", "--epochs 0", "argument --epochs: expected 1 to 100000, got 0"),
        ("", "--lr nan", "argument --lr: expected 1e-08 to 10.0, got nan"),
        ("", "--seed 1e20", "argument --seed: invalid 0 to 4294967295 value: '1e20'"),
        ("", "--image_size 30", "invalid choice: 30 (choose from 28, 32, 64, 128)"),
        ("", "--epoch 40", "unrecognized arguments: --epoch 40"),  # no abbreviations
        ("", "--resume --overwrite", "--resume continues the run in --out_dir: not with"),
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
