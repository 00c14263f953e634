"""
A Variational Autoencoder in one file of PyTorch, to read, to copy and to run.

This first part is the VAE: the models, the loss, a training step and loop, evaluation, the
log-likelihood, sampling, interpolation, saving and loading. It needs only torch: copied alone
into a file of your own, it is a complete VAE. In vae.py a command-line tool follows it, which
trains on MNIST or your images and draws what the model learned:

    python vae.py --data_dir ./mnist --epochs 30 --beta 0.5

The model (Kingma & Welling 2013). An image x is generated from a code z of latent_dim
numbers: z ~ p(z) = N(0, I), then x ~ p(x|z), a decoder network giving each pixel's
distribution. The posterior p(z|x) has no closed form (it needs an integral over all z), so an
encoder network approximates it by q(z|x) = N(mu(x), diag(exp(logvar(x)))), logvar = log sigma^2.
Both are trained by maximising, for each image, the evidence lower bound (ELBO) on its
log-likelihood:

    log p(x) >= ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))

KL is the Kullback-Leibler divergence, E_q[log q(z|x) - log p(z)] >= 0: how far q is from the
prior. We minimise loss = recon + beta * kl: recon = -log p(x|z) for one z ~ q(z|x) (an unbiased
estimate of minus the first term), kl the second in closed form, both in nats per image (natural
logarithms; divide by ln 2 for bits). With beta = 1 the loss is the negative ELBO, an upper bound
on -log p(x); beta > 1 (the beta-VAE of Higgins et al. 2017) is a looser bound, since KL >= 0;
beta < 1 is no bound at all.

References: Kingma & Welling, "Auto-Encoding Variational Bayes", 2013, arXiv:1312.6114;
Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained Variational
Framework", ICLR 2017; Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders",
2015, arXiv:1509.00519; Sohn, Lee & Yan, "Learning Structured Output Representation using
Deep Conditional Generative Models", NeurIPS 2015 (the conditional VAE).
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# Part 1: the VAE
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Images, and what each function returns
#
## Every function here that takes images, the models' own methods included, takes them as uint8
## in [0, 255] or floats in [0, 1], a batch (B, C, H, W) (or one (C, H, W) for interpolate):
## `to_float` turns the first into the second and, on the CPU, refuses floats out of range.
## Functions of one batch return tensors and leave them on the device (train_step's numbers, the
## models' outputs), so that a GPU never waits for the CPU to read a number; functions of a whole
## epoch or split (train_epoch, evaluate, defined below) read their sums once at the end and
## return a dict of Python numbers. Every loss is in nats (natural logarithms; divide by ln 2
## for bits) per image.


def to_float(images):
    """uint8 images in [0, 255] -> float32 in [0, 1]; float images are returned as they are.

    Raises ValueError for floats outside [0, 1]: under a Bernoulli likelihood 0-255 floats give
    a loss with no lower bound, and the logits run off to infinity. Checked on the CPU only: on
    a GPU, reading the result would make the CPU wait for every batch, so there they pass.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.device.type == "cpu" and images.numel():
        low, high = torch.aminmax(images)  # one pass
        if low < 0 or high > 1:
            raise ValueError(
                f"images must be uint8 in [0, 255] or floats in [0, 1], got floats from "
                f"{low.item():g} to {high.item():g}; divide 0-255 images by 255, or clamp images "
                f"that a resize took a little outside [0, 1] with x.clamp(0, 1)"
            )
    return images


# ---------------------------------------------------------------------------------------------
# The models
#
## Both models have the method names of pytorch/examples' VAE, and add sample(n); forward
## returns logits where theirs returns probabilities:
##   encode(x) -> (mu, logvar)      x: (B, C, H, W) images;  mu, logvar: (B, latent_dim)
##   reparameterize(mu, logvar) -> z               z: (B, latent_dim)
##   forward(x) -> (logits, mu, logvar)            logits: (B, C, H, W), what the loss takes
##   decode(z) -> x_hat             x_hat: (B, C, H, W) in [0, 1], the mean of p(x|z)
##   sample(n) -> n images decoded from z ~ N(0, I)
## The decoder ends in logits, and the model's output is what the loss takes: a cross-entropy
## computed from probabilities is clipped where the sigmoid has rounded to 0 or 1, and loses its
## gradient there; from the logits it is exact. The classic bug, a loss that applies a sigmoid
## to probabilities (the model then learns grey blurs), takes a deliberate call to write: the
## natural one, vae_loss(model(x)[0], ...), is right. Images come from the functions that make
## images: decode, reconstruct, sample, interpolate.

## Why the encoder predicts logvar = log sigma^2 and not sigma: a linear layer outputs any
## real number, and sigma must be positive. exp(logvar) is positive for every output, a step
## of the same size changes sigma by the same factor whether sigma is 1e-3 or 1, and the KL
## below needs log sigma^2 itself. The clamp keeps exp(logvar) finite: float32 overflows
## above exp(88), which one diverging step can reach; sigma = exp(logvar / 2) in [3e-7, 2e4]
## is far beyond any posterior a healthy run has (MNIST's sit between 0.05 and 1), which
## matters: a clamped output has no gradient, so a run must never need to reach the bounds.
LOGVAR_RANGE = (-30.0, 20.0)


def in_eval_mode(fn):
    """Decorator for fn(model, ...): run it in eval mode without gradients, then give the model
    back its train/eval mode. In train mode BatchNorm (see `ConvVAE`) normalises by the batch's
    own statistics, so an image's output would depend on the other images beside it, and each
    call would update the running averages that evaluation uses; without no_grad, every call
    would keep its graph in memory; and a function called between training steps must not leave
    the model in eval mode, where BatchNorm no longer learns."""

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


class VAE(nn.Module):
    """What every VAE here shares. A subclass builds `encoder`: x -> features h (B, n_h), `fc_mu`
    and `fc_logvar`: (B, n_h + num_classes) -> (B, latent_dim), `decoder`: z (B, latent_dim +
    num_classes) -> logits (B, C, H, W), and adds its own arguments to `model_args`, from which
    `load_model` rebuilds a ConvVAE or MLPVAE as `cls(**model_args)`.

    Conditional VAE (Sohn, Lee & Yan 2015, Sec. 3), when num_classes > 0: the encoder
    q(z|x, y) and the decoder p(x|z, y) also see the one-hot label y, appended to the
    encoder's features and to z; the prior stays N(0, I). Told the class, the decoder no
    longer needs z for it, so z holds the style (slant, thickness). One-hot, not the class index
    as a number, which would put the classes in an order with distances between them. y is (B,)
    integer class indices or (B, num_classes) floats (one-hot, or a mixture, as `interpolate`
    makes); an unconditional model refuses it.
    """

    def __init__(self, image_size, channels, latent_dim, num_classes=0):
        super().__init__()
        if min(image_size, channels, latent_dim) < 1 or num_classes < 0:
            raise ValueError(
                f"image_size, channels and latent_dim must be positive and num_classes >= 0, "
                f"got {image_size}, {channels}, {latent_dim} and {num_classes}"
            )
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        # the constructor's arguments as plain values, from which `load_model` rebuilds the model
        self.model_args = dict(image_size=image_size, channels=channels, latent_dim=latent_dim)
        self.model_args.update(num_classes=num_classes)

    def with_label(self, h, y):
        """h (B, n) -> (B, n + num_classes), the one-hot y appended (h if unconditional); ValueError
        when a conditional model gets no y."""
        if not self.num_classes:
            if y is not None:  # ignored, they would hide that the model was built without classes
                raise ValueError("this VAE is unconditional (num_classes 0): it takes no labels y")
            return h
        if y is None:
            raise ValueError("this conditional VAE needs the class labels y")
        onehot = y if y.is_floating_point() else F.one_hot(y.long(), self.num_classes)  # (B, K)
        return torch.cat([h, onehot.to(h.dtype)], dim=1)

    def encode(self, x, y=None):
        """x: (B, C, H, W) images (see `to_float`) -> mu, logvar: (B, latent_dim), logvar within
        LOGVAR_RANGE. ValueError for images out of range."""
        h = self.with_label(self.encoder(to_float(x)), y)  # (B, n_h + num_classes)
        return self.fc_mu(h), self.fc_logvar(h).clamp(*LOGVAR_RANGE)

    def reparameterize(self, mu, logvar, generator=None):
        """Draw z ~ N(mu, exp(logvar)) as z = mu + sigma * eps, eps ~ N(0, I); (B, latent_dim).

        The reparameterization trick (Kingma & Welling 2013, Sec. 2.4): the randomness is in
        eps, which does not depend on the encoder, so z is a differentiable function of mu and
        logvar and the gradient reaches the encoder. It samples in eval mode too: the test
        ELBO is an expectation over q(z|x), like the training one. generator: a torch.Generator
        on mu's device for eps; None draws from the global one. Evaluation passes one of its own,
        so that its numbers repeat and training's random stream is left where it was.
        """
        std = torch.exp(0.5 * logvar)  # sigma = sqrt(exp(logvar))
        eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return mu + std * eps

    def decode_logits(self, z, y=None):
        """z: (B, latent_dim) -> logits (B, C, H, W) of p(x|z); the loss takes these."""
        return self.decoder(self.with_label(z, y))

    def decode(self, z, y=None):
        """z: (B, latent_dim) -> x_hat (B, C, H, W) in [0, 1], the mean of p(x|z)."""
        return torch.sigmoid(self.decode_logits(z, y))

    def forward(self, x, y=None):
        """x: (B, C, H, W) images (and y for a conditional model) -> (logits, mu, logvar): the
        decoder's logits (B, C, H, W) for one z ~ q(z|x), which `vae_loss` takes as they are."""
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar)
        return self.decode_logits(z, y), mu, logvar

    @in_eval_mode  # BatchNorm uses its running statistics and does not update them
    def sample(self, n, y=None, generator=None):
        """n images decoded from z ~ N(0, I) (labels y (n,) if conditional): (n, C, H, W) in [0, 1],
        without gradients; generator: a torch.Generator on the model's device, for repeatable draws.

        Each image is the decoder's mean E[x|z], not a draw x ~ p(x|z): the pixels are independent
        given z, so a draw adds noise to each pixel on its own (salt and pepper for binary
        pixels), which shows the likelihood's noise rather than what z encodes. The model's mode
        and buffers are left as they were."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z, y)


class ResidualBlock(nn.Module):
    """x + f(x), then LeakyReLU, where f is two 3x3 convolutions with BatchNorm and a LeakyReLU
    between them: (B, C, H, W) -> (B, C, H, W) (He et al. 2016, "Deep Residual Learning", Fig. 2,
    with BatchNorm after each convolution as in their Sec. 3.4, and LeakyReLU for ReLU).

    What it buys a VAE. The strided convolutions that change the resolution do all of the
    encoder's and decoder's work with one layer per resolution; a block adds depth where the
    features are (two more layers and a wider view), and the identity path lets it learn a
    correction to x (nearly: the LeakyReLU after the sum scales negative values by 0.2), so a
    deeper network still trains as easily as the shallow one. In the decoder the depth can give a
    better p(x|z), and so a higher likelihood: on binarized MNIST one block a side took the
    NLL from 89.2 to 86.0 nats, at twice the time per step. At the lowest resolution (7 x 7 for
    MNIST) a block costs the fewest operations. The convolutions have no bias: the BatchNorm
    after each adds its own.
    """

    def __init__(self, channels):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(x + self.f(x))


class ConvVAE(VAE):
    """Convolutional VAE whose depth follows the image size.

    Encoder: blocks of Conv2d(kernel 4, stride 2) + BatchNorm2d + LeakyReLU, each halving the
    side until it is 7 or less, or odd (28 -> 14 -> 7; 32 -> 16 -> 8 -> 4; 64 -> ... -> 4), with
    base_channels, twice that, ... up to 256 channels; then res_blocks `ResidualBlock`s at that
    lowest resolution, and the linear heads for mu and logvar. Decoder: the mirror image, a linear
    layer, a reshape, res_blocks residual blocks, ConvTranspose2d blocks doubling the side back,
    ending in logits. Why so: stopping at a side of 7 or less keeps the flattened features that
    the linear heads see small; an even side at each halving lets the doublings return exactly
    to image_size; a kernel of 4 at stride 2 halves (and its transpose doubles) a side exactly,
    and the stride divides the kernel, which spares the decoder a checkerboard pattern; the cap
    on channels bounds the parameters; BatchNorm lets the stack train fast at a high learning
    rate (its cost: train and eval mode differ, see `in_eval_mode`); LeakyReLU keeps a gradient
    for the negative half of the activations that BatchNorm centres on 0.

    image_size: H = W, a multiple of 4 and at least 16 (else ValueError); channels: C (1 or 3,
    any works); latent_dim: size of z; num_classes: K > 0 for a conditional VAE (see `VAE`);
    res_blocks: residual blocks on each side, 0 for the plainest model (1 is worth its cost: see
    `ResidualBlock`).
    """

    def __init__(
        self,
        image_size=28,
        channels=1,
        latent_dim=32,
        base_channels=32,
        num_classes=0,
        res_blocks=0,
    ):
        super().__init__(image_size, channels, latent_dim, num_classes)
        if image_size < 16 or image_size % 4 or res_blocks < 0:
            raise ValueError(
                f"ConvVAE needs an image_size that is a multiple of 4 and at least 16, and "
                f"res_blocks >= 0, got {image_size} and {res_blocks}"
            )
        self.model_args.update(base_channels=base_channels, res_blocks=res_blocks)
        side = image_size
        widths = []
        while side % 2 == 0 and side > 7:  # at least twice, since image_size % 4 == 0
            side //= 2
            widths.append(min(base_channels * 2 ** len(widths), 256))
        self.feature_shape = (widths[-1], side, side)
        features = math.prod(self.feature_shape)

        enc = []
        c_in = channels
        for w in widths:
            enc += [
                nn.Conv2d(c_in, w, 4, stride=2, padding=1, bias=False),  # (B, w, S/2, S/2)
                nn.BatchNorm2d(w),
                nn.LeakyReLU(0.2),
            ]
            c_in = w
        enc += [ResidualBlock(c_in) for _ in range(res_blocks)]
        self.encoder = nn.Sequential(*enc, nn.Flatten())  # (B, w_last * side * side)
        self.fc_mu = nn.Linear(features + num_classes, latent_dim)
        self.fc_logvar = nn.Linear(features + num_classes, latent_dim)

        dec = [
            nn.Linear(latent_dim + num_classes, features),
            nn.LeakyReLU(0.2),
            nn.Unflatten(1, self.feature_shape),  # (B, w_last, side, side)
            *[ResidualBlock(widths[-1]) for _ in range(res_blocks)],
        ]
        for w_in, w_out in zip(widths[::-1], widths[-2::-1]):
            dec += [
                nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1, bias=False),  # side x 2
                nn.BatchNorm2d(w_out),
                nn.LeakyReLU(0.2),
            ]
        dec.append(nn.ConvTranspose2d(widths[0], channels, 4, stride=2, padding=1))  # logits
        self.decoder = nn.Sequential(*dec)


class MLPVAE(VAE):
    """Fully connected VAE: P -> hidden[0] -> hidden[1] ... -> latent_dim and back, P = C * H * W.

    image_size: H = W, any; channels: C; latent_dim: size of z; hidden: the encoder's layer
    widths, reversed in the decoder; num_classes: K > 0 for a conditional VAE (see `VAE`).
    """

    def __init__(self, image_size=28, channels=1, latent_dim=32, hidden=(512, 256), num_classes=0):
        super().__init__(image_size, channels, latent_dim, num_classes)
        self.model_args.update(hidden=list(hidden))
        pixels = channels * image_size * image_size
        enc = [nn.Flatten()]  # (B, C, H, W) -> (B, P)
        n_in = pixels
        for h in hidden:
            enc += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(n_in + num_classes, latent_dim)
        self.fc_logvar = nn.Linear(n_in + num_classes, latent_dim)
        dec = []
        n_in = latent_dim + num_classes
        for h in reversed(hidden):
            dec += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        dec += [nn.Linear(n_in, pixels), nn.Unflatten(1, (channels, image_size, image_size))]
        self.decoder = nn.Sequential(*dec)  # ends in logits


# ---------------------------------------------------------------------------------------------
# The loss
#
## Both terms are log-densities of one image, so both are sums: the decoder treats the pixels
## as independent given z, so log p(x|z) = sum over pixels of log p(x_i|z); q and p(z) are
## diagonal Gaussians, independent across latent dimensions, so their KL is the sum of one
## KL per dimension. The batch mean of these per-image values estimates the expectation over
## the data, which keeps the loss in nats per image whatever the batch size. Averaging the
## reconstruction over pixels instead would shrink it 784-fold against the KL: the same as
## a beta of 784, the usual origin of an unexplained tiny KL weight in VAE code.


def kl_per_dimension(mu, logvar):
    """KL(N(mu_j, sigma_j^2) || N(0, 1)) of each latent dimension j, in nats; (B, D) -> (B, D).

    Kingma & Welling (2013), Appendix B. Where the formula and its sign come from:
        KL = E_q[log q(z)] - E_q[log p(z)]
        E_q[log q(z)] = -1/2 (log 2 pi + log sigma^2 + 1)     since E_q[(z - mu)^2] = sigma^2
        E_q[log p(z)] = -1/2 (log 2 pi + mu^2 + sigma^2)       since E_q[z^2] = mu^2 + sigma^2
        KL = -1/2 (1 + log sigma^2 - mu^2 - sigma^2)
    The paper's eq. 10 has +1/2 (1 + log sigma^2 - mu^2 - sigma^2), which is -KL, the term as it
    enters the ELBO. Each KL_j >= 0 (s - 1 - log s >= 0 for s = sigma^2), 0 at mu_j = logvar_j = 0.
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu, logvar):
    """KL(q(z|x) || p(z)) in closed form, in nats per image: mu, logvar (B, D) -> (B,)."""
    return kl_per_dimension(mu, logvar).sum(-1)


def reconstruction_loss(recon_logits, x, likelihood="bernoulli", sigma=0.1):
    """-log p(x|z) for one z, in nats per image: logits and x (B, C, H, W) -> (B,).

    likelihood='bernoulli': each pixel Bernoulli with mean sigmoid(logit) (Kingma & Welling
        2013, Appendix C.1), computed from the logits for stability. A probability only for
        binary x: on grey pixels it is a cross-entropy that compares runs, not a likelihood.
    likelihood='gaussian': each pixel Normal(sigmoid(logit), sigma^2), one sigma for all
        pixels: a density of continuous x, with its constant,
            -log N(x; m, sigma^2) = (x - m)^2 / (2 sigma^2) + log sigma + 1/2 log(2 pi).
        sigma acts like beta: recon + beta * kl = (1 / sigma^2) (1/2 sum (x - m)^2 + beta
        sigma^2 kl) + const, a squared-error autoencoder whose KL weight is beta sigma^2. On
        [0, 1] pixels sigma = 1 weighs the reconstruction so little that the KL wins and few
        latent dimensions are used; a small sigma asks for sharp reconstructions. One sigma for
        all pixels, stated by the user: learned per pixel, it would have no floor on MNIST's
        always-black pixels. On 8-bit images this density (which can exceed 1) compares Gaussian
        runs with each other, not with published likelihoods of discrete pixels.
    x: uint8 or floats in [0, 1] (see `to_float`); sigma > 0. Raises ValueError when x is out of
    range (on the CPU) or likelihood is neither.
    """
    x = to_float(x)
    logits = recon_logits.float()  # sums of 784 or more terms, in float32 whatever the model's
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        per_pixel = (x - torch.sigmoid(logits)).pow(2) / (2 * sigma**2)
        per_pixel = per_pixel + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got '{likelihood}'")
    return per_pixel.flatten(1).sum(1)  # (B, C*H*W) -> (B,)


def vae_loss(
    recon_logits, x, mu, logvar, beta=1.0, likelihood="bernoulli", sigma=0.1, free_bits=0.0
):
    """The negative (beta-)ELBO and its two parts, each averaged over the batch:

        loss = recon + beta * kl     (Kingma & Welling 2013, eq. 10; Higgins et al. 2017, eq. 4)

    What beta trades. beta > 1 pulls every q(z|x) towards the prior: a smoother latent space
    whose random draws decode to plausible images, fewer latent dimensions in use, blurrier
    reconstructions; far enough, the posterior collapses (KL -> 0) and the decoder ignores
    z. beta < 1 lets the posteriors shrink and move away from the prior: sharper
    reconstructions, but gaps in z between the training images, so samples from N(0, I)
    look worse. beta = 0 is a plain autoencoder with noise.

    With free_bits = L > 0, the KL term becomes sum_j max(L, KL_j), KL_j the batch mean of
    dimension j's KL (Kingma et al. 2016, arXiv:1606.04934, eq. 15): a dimension under L
    nats is not pushed towards the prior, which keeps dimensions from collapsing early. The
    loss is then no longer a bound on -log p(x); the kl it returns stays the true one.

    Args:
        recon_logits: (B, C, H, W) the decoder's logits, `model(x)[0]`.
        x: (B, C, H, W) the images, uint8 or floats in [0, 1] (see `to_float`).
        mu, logvar: (B, latent_dim) from `model.encode`.
        beta: weight of the KL term (a float or a 0-dim tensor); 1 for the ELBO.
        likelihood, sigma: p(x|z), see `reconstruction_loss`.
        free_bits: L, nats per latent dimension.

    Returns (loss, recon, kl): scalar tensors in nats per image; loss == recon + beta * kl
    when free_bits is 0, and kl is always the true KL. Raises ValueError: x out of range (checked
    on the CPU), an unknown likelihood. beta is not checked here (it may be a tensor):
    `beta_schedule` refuses a negative beta, `train_epoch` a negative beta or free_bits.
    """
    rec = reconstruction_loss(recon_logits, x, likelihood, sigma).mean()
    kl_dims = kl_per_dimension(mu, logvar).mean(0)  # (D,) batch means
    kl = kl_dims.sum()
    kl_term = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return rec + beta * kl_term, rec, kl


# ---------------------------------------------------------------------------------------------
# Training
#
## The training set is one tensor in memory (MNIST: 60,000 x 28 x 28 bytes, 47 MB), batched by
## a shuffled index: no DataLoader, whose per-image Python work outlasts the model on a GPU.
## Kept as uint8 (4x smaller than float32), the images become floats a batch at a time.


def get_batch(images, idx, binarize=False):
    """images[idx] as floats (B, C, H, W) in [0, 1]. With binarize, each pixel is drawn as
    Bernoulli(intensity) afresh on every call: the dynamic binarization of Burda et al.
    (2015), under which the Bernoulli likelihood is a true likelihood of binary images. Drawn
    afresh, it also acts as data augmentation (one fixed binarization overfits sooner); the test
    images are binarized once, so that their numbers are likelihoods of fixed binary images."""
    x = to_float(images[idx])
    return torch.bernoulli(x) if binarize else x


def train_step(model, optimizer, x, beta=1.0, y=None, grad_clip=0.0, iwae_samples=1, **loss_args):
    """One optimizer step on a batch of images x (B, C, H, W) (labels y (B,) if conditional).
    beta and **loss_args (likelihood, sigma, free_bits): see `vae_loss`. iwae_samples = K > 1
    trains `iwae_loss` with K samples instead, which has no beta or free bits (`train_epoch`
    refuses them). grad_clip > 0 first rescales the gradient to at most that global L2 norm.

    Returns a dict of detached 0-dim tensors, left on the device: loss (recon + beta * kl without
    the free-bits floor, or minus the IWAE bound), recon and kl in nats per image, and grad_norm,
    the gradient's norm before any clipping, for a caller to log (a norm that grows by orders of
    magnitude, or turns inf or nan, is the first sign of a diverging run).
    """
    if iwae_samples > 1:
        loss_args.pop("free_bits", None)  # the bound has none (nor a beta)
        loss, rec, kl = iwae_loss(model, x, iwae_samples, y, **loss_args)
        shown = loss
    else:
        logits, mu, logvar = model(x, y)
        loss, rec, kl = vae_loss(logits, x, mu, logvar, beta, **loss_args)
        shown = rec + beta * kl  # what the log names recon + beta * kl: without the floor
    optimizer.zero_grad(set_to_none=True)  # gradients accumulate in .grad until cleared
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    if grad_clip > 0:  # a rare huge gradient would also swell Adam's moments for many steps
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, grad_norm)
    optimizer.step()
    stats = dict(loss=shown, recon=rec, kl=kl, grad_norm=grad_norm)
    return {k: v.detach() for k, v in stats.items()}  # no graph kept alive past the step


def beta_schedule(epoch, beta, kl_warmup=0):
    """The KL weight of epoch 1, 2, ...: rising linearly from 0 at epoch 1 to `beta` at epoch
    kl_warmup + 1, constant after (KL annealing, Bowman et al. 2016, Sec. 3.1). Starting with
    a small KL weight lets the decoder learn to use z before the KL pulls q to the prior.
    Raises ValueError for an epoch under 1, or a negative beta or kl_warmup."""
    if epoch < 1 or beta < 0 or kl_warmup < 0:
        raise ValueError(
            f"beta_schedule needs epoch >= 1 (epochs count from 1), beta >= 0 and kl_warmup >= 0, "
            f"got {epoch}, {beta} and {kl_warmup}"
        )
    if kl_warmup == 0:
        return beta
    return beta * min(1.0, (epoch - 1) / kl_warmup)


def cosine_decay(optimizer, epochs, last_epoch=-1):
    """torch's LambdaLR for a learning rate that falls along half a cosine, stepped once per
    epoch (scheduler.step() after each): epoch e = 1, 2, ... trains at lr (1 + cos(pi (e - 1) /
    epochs)) / 2, from the optimizer's lr down to 0.003 lr at the last of 30 (Loshchilov & Hutter
    2017, SGDR, eq. 5, one cycle). Why decay: at a constant rate, Adam's steps keep the weights
    moving about a minimum, by a distance that scales with lr; a falling rate lets them settle
    into it. last_epoch = k - 1 goes on after epoch k (each group's "initial_lr" is the lr)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: (1 + math.cos(math.pi * e / epochs)) / 2, last_epoch
    )


def train_epoch(
    model, optimizer, images, batch_size=128, beta=1.0, labels=None, binarize=False, **step_args
):
    """One pass over `images` in a random order: the training loop. A whole run is

        scheduler = cosine_decay(optimizer, epochs)
        for epoch in range(1, epochs + 1):
            train_epoch(model, optimizer, images, beta=beta_schedule(epoch, beta, kl_warmup))
            scheduler.step()

    (ConvVAE(res_blocks=1), Adam with lr 2e-3, the cosine decay and beta 1 fit MNIST in 30 epochs).

    images: (N, C, H, W) uint8, or float in [0, 1], on the model's device; labels: (N,) int64 there,
    for a conditional model; beta, binarize, **step_args (likelihood, sigma, free_bits, grad_clip,
    iwae_samples): see `train_step` and `get_batch`.

    Returns a dict of the epoch's means, in nats per image: loss (recon + beta * kl, or minus the
    IWAE bound), recon and kl. ValueError if beta < 0 or free_bits < 0, if an IWAE objective has
    a beta or free bits, or if labels do not fit the model (given or not).
    """
    free_bits = step_args.get("free_bits", 0)
    if beta < 0 or free_bits < 0:
        raise ValueError(f"beta and free_bits must be >= 0, got {beta} and {free_bits}")
    if step_args.get("iwae_samples", 1) > 1 and (beta != 1 or free_bits):
        raise ValueError(f"the IWAE objective has beta 1 and no free bits, got {beta}, {free_bits}")
    model.train()  # BatchNorm normalises by each batch's statistics and updates its running ones
    order = torch.randperm(len(images), device=images.device)  # new batches each epoch
    sums = torch.zeros(3, device=images.device)  # summed on the device, read once at the end
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]  # (B,)
        x = get_batch(images, idx, binarize)  # (B, C, H, W) in [0, 1]
        y = None if labels is None else labels[idx]
        stats = train_step(model, optimizer, x, beta, y, **step_args)
        # weighted by the batch's size, which is smaller for the last: the mean over images
        sums += torch.stack([stats["loss"], stats["recon"], stats["kl"]]) * len(idx)
    loss, rec, kl = (sums / len(order)).tolist()
    return dict(loss=loss, recon=rec, kl=kl)


# ---------------------------------------------------------------------------------------------
# Evaluation and generation
#
## `evaluate` gives the test -ELBO, the same single-sample estimate as the training loss at
## beta = 1, and what the latent space uses. `log_likelihood` gives the number the field
## compares models by: an estimate of log p(x) itself, which tightens towards it as the samples
## K grow. Both draw z from a torch.Generator of their own, seeded 0 unless one is passed: the
## same weights and batch size give the same numbers on the same device, and evaluating never
## moves the training's random stream (else evaluating would change what training reaches).
##
## Two measures of how many latent dimensions a model uses. The KL of dimension u, averaged
## over images, counts every nat by which q(z_u|x) differs from the prior, also a posterior
## narrowed or shifted the same way for every x, which tells the decoder nothing. An active
## unit (Burda et al. 2015, Sec. 5.2) asks whether the posterior mean mu_u moves with x:
## Var_x(mu_u) > 0.01. A dimension with some KL and no variance carries nothing about x.
ACTIVE_UNIT_THRESHOLD = 0.01


@in_eval_mode
def evaluate(
    model, images, labels=None, likelihood="bernoulli", sigma=0.1, generator=None, batch_size=1000
):
    """The test -ELBO, its recon and KL, over a split, in eval mode, with z sampled from q(z|x).

    images: (N, C, H, W) uint8, or float in [0, 1], on the model's device; labels: (N,) there,
    for a conditional model; likelihood, sigma: p(x|z), see `reconstruction_loss`; generator:
    for z (default: seeded 0). Returns a dict: neg_elbo (recon + kl), recon, kl: nats
    per image, the mean over images; kl_per_dim: the KL per latent dimension; mu_var: for
    each dimension u, the variance of mu_u across images; active_units: how many dimensions
    have mu_var > ACTIVE_UNIT_THRESHOLD.
    """
    generator = generator or torch.Generator(images.device).manual_seed(0)
    recon = torch.zeros((), device=images.device)  # summed over images
    dims = torch.zeros(3, model.latent_dim, device=images.device)  # per dim: sum KL, mu, mu^2
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size])
        y = None if labels is None else labels[start : start + batch_size]
        mu, logvar = model.encode(x, y)
        z = model.reparameterize(mu, logvar, generator)
        recon += reconstruction_loss(model.decode_logits(z, y), x, likelihood, sigma).sum()
        dims += torch.stack([kl_per_dimension(mu, logvar).sum(0), mu.sum(0), mu.pow(2).sum(0)])
    n = len(images)
    kl_per_dim, mu_mean, mu_sq = dims / n
    mu_var = (mu_sq - mu_mean.pow(2)).clamp(min=0)  # Var_x(mu_u), (D,); rounding can go below 0
    rec = recon.item() / n
    kl = kl_per_dim.sum().item()
    return dict(
        neg_elbo=rec + kl,
        recon=rec,
        kl=kl,
        kl_per_dim=kl_per_dim.tolist(),
        mu_var=mu_var.tolist(),
        active_units=int((mu_var > ACTIVE_UNIT_THRESHOLD).sum()),
    )


@in_eval_mode
def log_likelihood(
    model, x, k, y=None, likelihood="bernoulli", sigma=0.1, generator=None, max_decodes=4096
):
    """Importance-weighted estimate of log p(x), in nats per image (Burda et al. 2015, eq. 8):

        log p(x) ~= log (1/K) sum_k w_k,   w_k = p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x)

    Its expectation lies between the ELBO and log p(x); a single estimate may land above log p(x).
    Why:
    p(x) = E_q[w] exactly (importance sampling), and the log of an average is at least the
    average of the logs (Jensen, log is concave), so
        log p(x) = log E[(1/K) sum_k w_k] >= E[log (1/K) sum_k w_k]   (the estimate)
                                          >= E[(1/K) sum_k log w_k] = E_q[log w] = ELBO.
    K = 1 is the ELBO, estimated with a sampled KL (`evaluate` uses its closed form). Why it
    rises with K, in expectation (Burda et al., Thm. 1): the mean of K weights is the
    average of the means of its subsets of K - 1, so by Jensen again the bound with K is at
    least the bound with K - 1. And it reaches log p(x) as K -> infinity: the mean of the w_k
    then converges to p(x) itself (for bounded w_k), and the first gap closes.

    Args:
        model: a module with `encode`, `decode_logits` and `latent_dim`; it runs in eval mode.
        x: (B, C, H, W) uint8 or in [0, 1] (see `to_float`); binary for a true Bernoulli
            likelihood.
        k: the number of importance samples, >= 1 (else ValueError); decoded in chunks of
            about max_decodes images, since K * B decodes at once (1000 x 100) fill any memory.
        y: (B,) integer or (B, num_classes) one-hot labels for a conditional model, whose
            estimate is then of log p(x|y).
        likelihood, sigma: p(x|z) as the model was trained with it (`reconstruction_loss`), or
            for a model of your own a function (logits, x) -> (N,) log p(x|z) (not minus it).
        generator: for the z_k (default: seeded 0).

    Returns:
        (B,) estimates of log p(x) in nats (the NLL is minus them). Raises ValueError: x out
        of range (checked on the CPU), an unknown likelihood.
    """
    if k < 1:
        raise ValueError(f"log_likelihood needs k >= 1 importance samples, got {k}")
    x = to_float(x)
    generator = generator or torch.Generator(x.device).manual_seed(0)
    cond = () if y is None else (y,)  # so that a model with encode(x) and decode_logits(z) works
    mu, logvar = model.encode(x, *cond)  # (B, D)
    chunk = max(1, max_decodes // len(x))
    log_w = [
        log_weights(model, x, mu, logvar, min(chunk, k - start), y, likelihood, sigma, generator)[0]
        for start in range(0, k, chunk)
    ]
    # the log of the mean of the w_k, from the log w_k: on MNIST log w is about -90 nats, whose
    # exp() underflows float32 to 0
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)  # (B,)


def log_weights(model, x, mu, logvar, k, y=None, likelihood="bernoulli", sigma=0.1, generator=None):
    """The log importance weights log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) of k draws
    z_k ~ q(z|x) = N(mu, exp(logvar)) for each image, and their log p(x|z_k): two (k, B), nats, with
    gradients (the reparameterization trick, as in `VAE.reparameterize`). Shared by `log_likelihood`
    and `iwae_loss`. x: (B, C, H, W) images; mu, logvar: (B, D) from `model.encode`; y,
    likelihood, sigma, generator: see `log_likelihood`. `likelihood` may also be a function (logits,
    x) -> (N,) log p(x|z), for a model of your own."""
    x = to_float(x)
    b = len(x)
    eps = torch.randn(k, b, mu.shape[1], device=x.device, dtype=mu.dtype, generator=generator)
    z = mu + torch.exp(0.5 * logvar) * eps  # (k, B, D)
    labels = () if y is None else (torch.cat([y] * k),)  # (k*B,) or (k*B, K), in z's order
    logits = model.decode_logits(z.flatten(0, 1), *labels)  # (k*B, C, H, W)
    x_k = x.repeat(k, 1, 1, 1)
    if callable(likelihood):
        log_px_z = likelihood(logits, x_k).view(k, b)
    else:
        log_px_z = -reconstruction_loss(logits, x_k, likelihood, sigma).view(k, b)
    log_2pi = math.log(2 * math.pi)
    log_pz = -0.5 * (z.pow(2) + log_2pi).sum(-1)  # log N(z; 0, I), (k, B)
    # log N(z; mu, sigma^2), (k, B), with (z - mu) / sigma = eps exactly: no division by sigma
    log_qz = -0.5 * (eps.pow(2) + logvar + log_2pi).sum(-1)
    return log_px_z + log_pz - log_qz, log_px_z


def iwae_loss(model, x, k, y=None, likelihood="bernoulli", sigma=0.1):
    """The importance weighted autoencoder's objective (Burda et al. 2015, eq. 8), to train with:
    minus the bound `log_likelihood` estimates, log (1/K) sum_k w_k, averaged over the batch, with
    gradients; and, to watch, the ELBO's two parts: recon (the mean of -log p(x|z_k) over the K
    draws) and the closed-form KL. Returns (loss, recon, kl), nats per image.

    What K buys. The ELBO (K = 1) pays log p(x) - ELBO = KL(q(z|x) || p(z|x)) for every image, so it
    trains the decoder only as well as q can follow the true posterior. With K draws the gap shrinks
    as K grows: the bound tightens towards log p(x); a draw far from p(z|x) gets a tiny weight and
    costs little, so q need only put some of its draws where p(z|x) is (it may be broader than under
    the ELBO), and the decoder is trained for a better likelihood. The cost is K decodes per image,
    so it may be kept for the last epochs of a run that trained on the ELBO.
    With K = 1 it is the ELBO with a sampled KL, log q(z|x) - log p(z), in place of the closed form:
    the same in expectation, noisier.
    x: (B, C, H, W) uint8 or in [0, 1]; k >= 1; y, likelihood, sigma: see `log_likelihood`."""
    x = to_float(x)
    mu, logvar = model.encode(x, y)
    log_w, log_px_z = log_weights(model, x, mu, logvar, k, y, likelihood, sigma)  # (K, B)
    loss = -(torch.logsumexp(log_w, dim=0) - math.log(k)).mean()
    return loss, -log_px_z.mean(), kl_divergence(mu, logvar).mean()


@in_eval_mode
def reconstruct(model, x, y=None):
    """Images x (B, C, H, W), uint8 or in [0, 1] (labels y (B,) if conditional), decoded from
    their posterior means mu: (B, C, H, W) in [0, 1]. The mean is the model's best single guess
    of z, so this shows what the code keeps of each image; a random z ~ q(z|x) would add the
    posterior's noise to it."""
    x = to_float(x)
    return model.decode(model.encode(x, y)[0], y)


@in_eval_mode
def interpolate(model, x_a, x_b, steps=10, y_a=None, y_b=None):
    """Decode `steps` points on the line from mu(x_a) to mu(x_b): (steps, C, H, W) in [0, 1].
    A smooth latent space turns one image into the other through plausible images; gaps between
    the posteriors show as blurs or shapes of neither. (Points mid-way have a smaller norm than
    typical draws from N(0, I), which makes them a little more average.)

    x_a, x_b: single images, (C, H, W) or (1, C, H, W), uint8 or in [0, 1]. The first and last
    images are decode(mu(x_a)) and decode(mu(x_b)). A conditional model takes their labels y_a,
    y_b (ints), and its one-hot label moves from y_a to y_b along with z. ValueError when x_a
    or x_b is not one image, or a conditional model is given no labels.
    """
    if model.num_classes and (y_a is None or y_b is None):
        raise ValueError("interpolate on a conditional VAE needs the labels y_a and y_b")
    ends = []
    for x in (x_a, x_b):
        if x.ndim == 4 and len(x) == 1:
            x = x[0]
        if x.ndim != 3:
            raise ValueError(f"interpolate takes single images (C, H, W), got {tuple(x.shape)}")
        ends.append(to_float(x))
    y = None
    if model.num_classes:
        y = F.one_hot(torch.tensor([y_a, y_b], device=x_a.device), model.num_classes).float()
    mu = model.encode(torch.stack(ends), y)[0]  # (2, D)
    t = torch.linspace(0, 1, steps, device=x_a.device).unsqueeze(1)  # (steps, 1)
    z = (1 - t) * mu[0] + t * mu[1]  # (steps, D)
    return model.decode(z, None if y is None else (1 - t) * y[0] + t * y[1])  # y: (steps, K)


# ---------------------------------------------------------------------------------------------
# Saving and loading
#
## A saved model describes itself, as nanoGPT's checkpoints keep model_args: the file holds the
## class's name and constructor arguments beside the weights, so `load_model` rebuilds it from
## the file alone. torch.load(weights_only=True) reads tensors and plain values only: a pickle
## that carries Python objects could run code when loaded, so it is refused. The likelihood and
## sigma a model was trained with are not part of it: keep them beside it, in `extra`.


def save_model(model, file, **extra):
    """Save model (a ConvVAE or MLPVAE) to `file` (a path or a binary file object), in torch.save's
    order, as a plain dict: model_class, model_args, model (the weights), and the plain values of
    `extra` (an optimizer's state_dict, say). The model is saved as it is; a loaded one returns
    in eval mode."""
    state = dict(model_class=type(model).__name__, model_args=model.model_args)
    torch.save(dict(state, model=model.state_dict(), **extra), file)


def model_from_dict(state, name="the file"):
    """The model described by the dict of a `save_model` file (as torch.load returns it), on the
    device its weights were loaded to, in eval mode. ValueError names the file (`name`) when the
    dict is not one of `save_model` (a plain state_dict, say) or its weights do not fit."""
    classes = {cls.__name__: cls for cls in (ConvVAE, MLPVAE)}
    if not isinstance(state, dict) or state.get("model_class") not in classes:
        raise ValueError(
            f"{name} was not written by save_model: it names no model class ConvVAE or MLPVAE; "
            f"for a plain state_dict, build the model and call model.load_state_dict(torch.load(...))"
        )
    try:
        model = classes[state["model_class"]](**state["model_args"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        described = f"{state['model_class']}({state.get('model_args')})"
        raise ValueError(
            f"the weights in {name} do not fit the {described} it describes ({type(e).__name__})"
        ) from None
    return model.to(next(iter(state["model"].values())).device).eval()


def load_model(file, map_location="cpu"):
    """The model saved by `save_model` in `file`, on map_location (a device), in eval mode, as
    evaluation and sampling want it (call model.train() to train it further).
    torch.load(weights_only=True) refuses a file that carries Python objects, which could run code
    when loaded. ValueError as `model_from_dict`; torch.load's errors (no file, not a PyTorch file,
    a pickle with code) pass through."""
    state = torch.load(file, map_location=map_location, weights_only=True)
    return model_from_dict(state, f"'{file}'")


# =============================================================================================
# Part 2: the tool. Datasets, devices and several processes, files and checkpoints, figures,
# the command line. It builds on Part 1: `train` is the list of what a run does, and `main`, at
# the end, runs it or evaluates a checkpoint.
# =============================================================================================

import argparse
import contextlib
import csv
import gc
import importlib
import io
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist


class UserError(Exception):
    """Bad input or a stop that `main` prints as one sentence, without a traceback, and exits with
    `exit_code`: 2 for bad input, 1 for any other stop, 130 for Ctrl-C."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# Data
#
# Each split is read once into one uint8 tensor (N, C, S, S), the form Part 1 takes, with every
# conversion (channels, size) done here. Two sources: torchvision's datasets, and any folder of
# images. A new dataset is a new entry of DATASETS and a branch of `load_dataset`.

DATASETS = {  # each dataset's torchvision class, or None for a folder of your images
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "CIFAR10",
    "folder": None,
}
IMAGE_SIZES = (28, 32, 64, 128)
FOLDER_TEST_FRACTION = 0.1  # without train/ and val/: a fixed random 10% (seed 0) is the test split
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def default_data_dir(dataset):
    """Where --data_dir points when it is not given."""
    return "./mnist" if dataset == "mnist" else "./data"


def load_dataset(name, data_dir, image_size=None, channels=None, binarize=False):
    """Dataset `name` (of DATASETS) from data_dir, on the CPU: a dict of train_x, test_x (N, C, S,
    S) uint8; train_y, test_y (N,) int64, or None for unlabelled images; classes (names, or None);
    note (a sentence for the log, or None). image_size, channels: None keeps the data's (a
    folder's: 64 and 3). binarize draws the test set once as binary pixels, Bernoulli(intensity),
    seeded on the CPU: the same set on every device. UserError names what is wrong."""
    if name == "folder":
        data = load_folder(data_dir, image_size or 64, channels or 3)
    else:
        data = load_torchvision(name, data_dir, image_size, channels)
    if binarize:
        g = torch.Generator().manual_seed(0)
        data["test_x"] = torch.bernoulli(to_float(data["test_x"]), generator=g).byte() * 255
    return data


def load_torchvision(name, data_dir, image_size=None, channels=None):
    """A torchvision dataset from data_dir, downloaded if its files are missing."""
    from torchvision import datasets  # imported here: importing torchvision takes a second
    from torchvision.transforms.functional import resize, rgb_to_grayscale

    cls = getattr(datasets, DATASETS[name])
    if name == "cifar10":
        folder = os.path.join(data_dir, cls.base_folder)
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    else:
        folder = os.path.join(data_dir, cls.__name__, "raw")
        files = [os.path.splitext(f)[0] for f, _ in cls.resources]  # the uncompressed files
    present = all(os.path.isfile(os.path.join(folder, f)) for f in files)
    data = dict(note=None)
    for split in ("train", "test"):
        quiet = io.StringIO()  # torchvision prints every mirror it tries
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds = cls(data_dir, train=split == "train", download=not present)
        except Exception as e:
            reason = (str(e).strip() or type(e).__name__).splitlines()[-1]  # torchvision's own
            what = "cannot be read" if present else "is not there and could not be downloaded"
            raise UserError(
                f"{cls.__name__} in '{folder}' {what} ({reason}); put its {len(files)} original "
                f"files there ({', '.join(files)}: as torchvision names them, uncompressed), or "
                f"point --data_dir at a folder whose {os.path.relpath(folder, data_dir)}/ has them."
            ) from None
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W[, C]) -> NCHW
        if channels == 3 and x.shape[1] == 1:  # gray repeated into RGB
            x = x.expand(-1, 3, -1, -1)
        if channels == 1 and x.shape[1] == 3:  # RGB to luma, with PIL's weights (ITU-R 601-2)
            x = torch.cat([rgb_to_grayscale(chunk) for chunk in x.split(4096)])
        if image_size and image_size != x.shape[-1]:  # in chunks: resize makes a float copy
            x = torch.cat([resize(c, [image_size] * 2, antialias=True) for c in x.split(4096)])
        data[f"{split}_x"] = x.contiguous()
        data[f"{split}_y"] = torch.as_tensor(ds.targets).long()
    return dict(data, classes=list(ds.classes))


def list_images(root, seen):
    """(paths, labels or None, class names or None) of the images under root: a class per
    subfolder (ImageFolder's layout), or, without subfolders, root's images unlabelled. Only
    regular files with one of torchvision's image extensions, hidden ones skipped. `seen`, the
    real paths taken so far (shared by both splits), ends a link loop and takes each file once."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def raise_error(e):  # os.walk would skip a folder it cannot list, silently
        raise e

    def images(folder):
        found = []
        for top, dirs, files in os.walk(folder, onerror=raise_error, followlinks=True):
            seen.add(os.path.realpath(top))
            real = {d: os.path.realpath(os.path.join(top, d)) for d in dirs}
            dirs[:] = sorted(d for d in dirs if d[0] != "." and real[d] not in seen)
            for name in sorted(files):
                path = os.path.realpath(os.path.join(top, name))
                ok = name[0] != "." and name.lower().endswith(IMG_EXTENSIONS) and path not in seen
                if ok and os.path.isfile(path):
                    seen.add(path)
                    found.append(path)
        return found

    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
    if not classes:
        return images(root), None, None
    found = [images(os.path.join(root, name)) for name in classes]
    labels = [c for c, paths in enumerate(found) for _ in paths]
    return sum(found, []), labels, classes


def folder_splits(data_dir):
    """(train, test, classes, note) of an image folder, each split (paths, labels or None):
    train/ and val/ (or test/) if it has them, else a fixed random FOLDER_TEST_FRACTION of it."""
    has = lambda d: os.path.isdir(os.path.join(data_dir, d))  # noqa: E731
    test_name = next((d for d in ("val", "test") if has(d)), None)
    seen = set()
    if has("train") and test_name:
        train_paths, train_y, classes = list_images(os.path.join(data_dir, "train"), seen)
        test_paths, test_y, test_classes = list_images(os.path.join(data_dir, test_name), seen)
        if set(test_classes or [None]) - set(classes or [None]):  # labelled or not, as train/
            raise UserError(
                f"'{data_dir}/{test_name}' has classes {test_classes} that do not match those "
                f"of '{data_dir}/train', {classes}."
            )
        if classes is not None:  # class indices follow the training split's names
            test_y = [classes.index(test_classes[c]) for c in test_y]
        note = f"splits: {data_dir}/train, {test_name}"
        return (train_paths, train_y), (test_paths, test_y), classes, note
    root = os.path.join(data_dir, "train") if has("train") else data_dir
    paths, labels, classes = list_images(root, seen)
    if len(paths) < 2:
        raise UserError(f"'{root}' holds {len(paths)} images vae.py reads; it needs at least 2.")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    n_test = max(1, round(FOLDER_TEST_FRACTION * len(paths)))
    split = lambda part: ([paths[i] for i in part], labels and [labels[i] for i in part])  # noqa
    note = (
        f"no train/ and val/ (or test/) subfolders in '{data_dir}', so a fixed random "
        f"{FOLDER_TEST_FRACTION:.0%} of its images (seed 0) is the test split"
    )
    return split(order[n_test:]), split(order[:n_test]), classes, note


def load_image(path, image_size, channels):
    """One image file -> (channels, image_size, image_size) uint8: its centre square (so that
    nothing long is made longer), resized with antialiasing; a JPEG is decoded at the smallest
    scale that keeps image_size. UserError names a file that PIL cannot read, or whose pixels
    have more than 8 bits (refused, not scaled by a guess at their range)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    try:
        with Image.open(path) as im:
            if im.mode not in EIGHT_BIT_MODES:
                raise ValueError(f"its pixels are of mode {im.mode}, more than 8 bits")
            im.draft("RGB" if channels == 3 else "L", (image_size, image_size))
            side = min(im.size)
            left = (im.width - side) // 2
            top = (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            im = im.convert("RGB" if channels == 3 else "L")  # also palette and alpha images
            return pil_to_tensor(resize(im, [image_size, image_size], antialias=True))
    except Exception as e:  # PIL raises many types for a file it cannot read
        raise UserError(
            f"cannot read the image '{path}' ({e}); convert it to an 8-bit image, or remove it."
        ) from None


def load_folder(data_dir, image_size=64, channels=3):
    """A folder of images (see `folder_splits`), read once by up to 8 threads (PIL decodes
    without holding Python's lock). An image over PIL's pixel limit (Image.MAX_IMAGE_PIXELS, a
    guard against decompression bombs) is refused by name."""
    from PIL import Image
    from tqdm import tqdm

    if not os.path.isdir(data_dir):
        raise UserError(
            f"--data_dir '{data_dir}' is not a folder; --dataset folder needs a folder of images "
            f"(class subfolders, or images directly in it)."
        )
    train, test, classes, note = folder_splits(data_dir)
    data = dict(
        classes=classes, note=note + ("" if classes else "; no class subfolders, no labels")
    )
    load = functools.partial(load_image, image_size=image_size, channels=channels)
    with warnings.catch_warnings(), ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning: a refusal
        for split, (paths, labels) in (("train", train), ("test", test)):
            if not paths:
                raise UserError(f"the {split} split of '{data_dir}' has no images vae.py reads.")
            bar = tqdm(desc=f"reading {split}", total=len(paths), disable=not sys.stderr.isatty())
            try:
                images = [bar.update() or image for image in pool.map(load, paths)]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a bad file stops the reading now
                raise
            data[f"{split}_x"] = torch.stack(images)
            data[f"{split}_y"] = None if labels is None else torch.tensor(labels)
            bar.close()
    return data


def load_data(config, device):
    """The run's data: `load_dataset`'s dict for the settings of `config` (dataset, data_dir,
    image_size, channels, binarize, conditional), with train_x, test_x on the device, train_y,
    test_y there for a conditional model (else None), and labels, the test labels on the CPU."""
    keys = ("dataset", "data_dir", "image_size", "channels", "binarize")
    data = load_dataset(*(config[k] for k in keys))
    if data["note"]:
        print(f"data: {data['note']}", flush=True)
    if config["conditional"] and data["train_y"] is None:
        raise UserError(
            "--conditional needs class labels, and these images have none; use a dataset with "
            "classes, or a folder with one subfolder per class."
        )
    data["labels"] = data["test_y"]
    for split in ("train", "test"):
        data[f"{split}_x"] = data[f"{split}_x"].to(device)
        data[f"{split}_y"] = data[f"{split}_y"].to(device) if config["conditional"] else None
    return data


# ---------------------------------------------------------------------------------------------
# Devices and several processes


def select_device(name, deterministic=False):
    """'auto' -> cuda, then mps, then cpu; a named device must be available (else UserError).
    deterministic: PyTorch's deterministic algorithms, for repeatable CUDA runs (CPU runs are)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True)
    available = dict(
        cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available()
    )
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif not available[name]:
        raise UserError(
            f"--device {name} was asked for but is not available here; use --device auto or cpu."
        )
    if name == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # fixed shapes: cuDNN's fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores, as cuDNN's
    return torch.device(name)


@contextlib.contextmanager
def process_group(device):
    """Within it, a process that torchrun started is in the process group (nccl on CUDA, each
    process on cuda:LOCAL_RANK; gloo on the CPU): it yields (rank, world size, this process's
    device); (0, 1, device) without torchrun. UserError on mps, or with more processes than GPUs."""
    if "LOCAL_RANK" not in os.environ:
        yield 0, 1, device
        return
    if device.type == "mps":
        raise UserError("torchrun needs --device cuda or cpu: PyTorch has no distributed mps.")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started process {device.index} on a machine with "
                f"{torch.cuda.device_count()} GPU(s); give --nproc_per_node at most that."
            )
        torch.cuda.set_device(device)
    # torch.distributed.nn's functions take group.WORLD as a default argument, fixed when DDP first
    # imports them: imported after the group exists, they would keep it past destroy_process_group,
    # and gloo's threads would end only at interpreter exit, where they can abort the process.
    importlib.import_module("torch.distributed.nn")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
        dist.barrier()  # gloo can abort a process that leaves while another still works
    finally:
        gc.collect()  # a DDP model in a reference cycle would free the group's work at exit, too late
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, run folders, checkpoints
#
# Every file is written into a temporary file in its folder and moved into place, so that a crash
# mid-write leaves the previous complete file, never half of one.


def atomic_write(path, write):
    """Write `path` through write(f), f a binary file, atomically. UserError (exit code 1) when the
    disk is full or the folder unwritable; `path` then keeps its previous content."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")  # one writer per process and file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        raise UserError(
            f"cannot write '{path}' ({e.strerror or e}); its previous version, if any, is intact: "
            f"free some space or choose another --out_dir.",
            1,
        ) from None


def save_json(obj, path):
    """Write obj as JSON to path, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def save_csv(rows, path):
    """Write a list of dicts (the same keys) to path as CSV with a header, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    # surrogateescape: a folder name's bytes that are not UTF-8 are written as they are
    atomic_write(path, lambda f: f.write(text.getvalue().encode(errors="surrogateescape")))


RUN_FILES = re.compile(
    r"checkpoint\.pt|config\.json|metrics\.csv|evaluation\.json|per_class\.csv|\.tmp-.*|"
    r"(reconstructions(_epoch\d+)?|samples|samples_per_class|interpolation|loss_curves|"
    r"traversals|latent_distribution|class_means|latent_pca|recon_error_hist|best_worst|"
    r"manifold)\.png"
)


def run_files(folder):
    """The names of the files in `folder` that a run of vae.py writes, sorted."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return sorted(name for name in os.listdir(folder) if RUN_FILES.fullmatch(name))
    return []


def refuse_other_run(out_dir, overwrite, training=True):
    """UserError when out_dir holds files of another run and `overwrite` is not given."""
    found = [name for name in run_files(out_dir) if not name.startswith(".tmp-")]
    if found and not overwrite:
        more = ", ..." if len(found) > 3 else ""
        resume = "continue it with --resume, " if training and "checkpoint.pt" in found else ""
        raise UserError(
            f"'{out_dir}' already holds the files of another run ({', '.join(found[:3])}{more}); "
            f"{resume}replace them with --overwrite, or choose another --out_dir."
        )


def prepare_output_dir(out_dir, overwrite=False, resume=False, training=True):
    """Create out_dir and lock it: returns the open lock file, held until this process closes it
    or exits (a crash leaves no stale lock), so that a second run into the folder refuses at once.
    Then remove a killed run's temporary files and, with `overwrite`, the earlier run's files and
    those of its eval/. UserError if the folder cannot be made or is locked."""
    import fcntl

    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a")
    except OSError as e:
        raise UserError(
            f"cannot create --out_dir '{out_dir}' ({e.strerror}); choose another."
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UserError(
            f"another run is writing into '{out_dir}' now; let it finish, or choose another --out_dir."
        ) from None
    if not resume:  # again, now that no other run can write here
        refuse_other_run(out_dir, overwrite, training)
    for folder in (out_dir, os.path.join(out_dir, "eval")) if overwrite else (out_dir,):
        for name in run_files(folder):
            if overwrite or name.startswith(".tmp-"):
                os.remove(os.path.join(folder, name))
    return lock


def save_checkpoint(path, model, **extra):
    """Part 1's `save_model` with the plain values of `extra` (a run's optimizer state, epoch,
    config, history, random state), written atomically."""
    buffer = io.BytesIO()  # torch's zip writer turns a full disk into an unclear RuntimeError
    save_model(model, buffer, **extra)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path, device="cpu"):
    """A checkpoint, read once: (its model on `device` in eval mode, by Part 1's `model_from_dict`,
    and the file's dict). UserError, one sentence, when there is no such file or it cannot be
    loaded: not a PyTorch file, a truncated one, a pickle that carries code (refused by
    weights_only=True), a model that vae.py cannot rebuild from it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        return model_from_dict(state, f"'{path}'"), state
    except FileNotFoundError:
        raise UserError(f"there is no checkpoint at '{path}'.") from None
    except ValueError as e:  # model_from_dict's, which names the file
        raise UserError(f"{e}.") from None
    except Exception as e:  # torch's reader fails in many ways on a file that is not a checkpoint
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"'{path}' cannot be loaded as a model of vae.py ({reason}).") from None


# ---------------------------------------------------------------------------------------------
# Figures and the latent-space analysis
#
# Plots go through matplotlib's object API (no pyplot, so that a caller's backend is left alone).
# Each figure is a short function on two helpers: `save_grid` for images, `save_figure` for any.


def _figure(width, height):
    from matplotlib.figure import Figure  # imported here: only the figures need matplotlib

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path):
    """Write a matplotlib figure to path as a PNG, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _literal(name):
    """A name as matplotlib should draw it: '$' escaped (it would start mathematics), and bytes that
    are not UTF-8 (a file system allows them) as U+FFFD, which a font can show."""
    return os.fsencode(str(name)).decode("utf-8", "replace").replace("$", r"\$")


def save_grid(rows, path, title, row_labels=(), col_labels=()):
    """Rows of images (R, n, C, H, W) in [0, 1] as one titled grid, two screen pixels per image
    pixel, with a label per row and per column if given."""
    from torchvision.utils import make_grid

    r, n = rows.shape[:2]
    grid = make_grid(rows.flatten(0, 1).float().cpu(), nrow=n, padding=2, pad_value=1.0)
    h, w = grid.shape[1:]  # grid: (3, h, w)
    ax = _figure(1.5 + w / 50, 0.6 + h / 50).subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([2 + (h - 2) / r * (i + 0.5) for i in range(len(row_labels))])
    ax.set_yticklabels(map(_literal, row_labels))
    ax.set_xticks([2 + (w - 2) / n * (i + 0.5) for i in range(len(col_labels))], col_labels)
    ax.tick_params(length=0)
    ax.set_title(title)
    save_figure(ax.figure, path)


def _hist(ax, values, **kwargs):
    """ax.hist of a tensor's values in 100 bins over their range, widened where it is narrower
    than float resolution (all values equal, or equal to 7 digits near 1e30), which matplotlib
    cannot cut into bins."""
    values = values.double().flatten().numpy()
    low, high = values.min(), values.max()
    scale = max(abs(low), abs(high), 1.0)
    if high - low < 1e-6 * scale:
        low, high = low - 1e-3 * scale, high + 1e-3 * scale
    ax.hist(values, bins=100, range=(low, high), **kwargs)


def save_reconstructions(model, x, path, title, y=None):
    """Images x (B, C, H, W) in [0, 1] above their reconstructions from the posterior mean."""
    save_grid(torch.stack([x, reconstruct(model, x, y)]), path, title, ["image", "decode(mu)"])


def save_samples(model, path, classes=None, seed=0):
    """8 x 8 images decoded from z ~ N(0, I) (seeded); for a conditional model, a row per class
    (names `classes`) decoding the same 10 z, so that a column keeps one style."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    if not model.num_classes:
        images = model.sample(64, generator=g)
        title = "samples: z ~ N(0, I), decoded to the mean of p(x|z)"
        save_grid(images.view(8, 8, *images.shape[1:]), path, title)
        return
    k = model.num_classes
    z = torch.randn(10, model.latent_dim, device=device, generator=g)
    images = model.decode(z.repeat(k, 1), torch.arange(k, device=device).repeat_interleave(10))
    title = "conditional samples: row = label y, column = one z ~ N(0, I)"
    save_grid(images.view(k, 10, *images.shape[1:]), path, title, [str(c) for c in classes])


def plot_losses(history, path):
    """The -ELBO, recon and KL per epoch, train (the means over each epoch as it learns) and test,
    in nats per image, from the metrics' rows. The -ELBO weighs the KL by 1 whatever the run
    minimised, which its title names: a beta, or the IWAE bound (whose epochs show the ELBO of
    their K draws: their mean recon, and the KL)."""
    betas = sorted({row["beta"] for row in history})
    trained = ""
    if betas != [1]:
        shown = f"{betas[0]:g}" if len(betas) == 1 else f"from {betas[0]:g} to {betas[-1]:g}"
        trained = f"\n(the run minimised recon + beta * KL, beta {shown})"
    o = [row["objective"] for row in history]
    pieces = [(row["epoch"], o[i]) for i, row in enumerate(history) if i == 0 or o[i] != o[i - 1]]
    if [p[1] for p in pieces] != ["elbo"]:  # the IWAE bound, or the ELBO then the bound
        name = {"elbo": "the ELBO"}
        words = [name.get(obj, f"the {obj.upper()} bound") for _, obj in pieces]
        later = "".join(
            f",\nthen from epoch {e} on {w}" for (e, _), w in zip(pieces[1:], words[1:])
        )
        trained += f"\n(trained on {words[0]}{later})"
    fig = _figure(12, 3.8)
    panels = {"neg_elbo": f"-ELBO = recon + KL{trained}", "recon": "reconstruction -log p(x|z)"}
    panels["kl"] = "KL(q(z|x) || p(z))"
    epochs = [row["epoch"] for row in history]
    for ax, (key, title) in zip(fig.subplots(1, 3), panels.items()):
        keys = ("train_recon", "train_kl") if key == "neg_elbo" else (f"train_{key}",)
        ax.plot(epochs, [sum(row[k] for k in keys) for row in history], "o-", ms=3, label="train")
        ax.plot(epochs, [row[f"test_{key}"] for row in history], "s-", ms=3, label="test")
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs 1, 2, not 1.2
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def save_latent_distribution(mu, logvar, stats, path, seed=0):
    """The aggregate posterior q(z) against the prior, the posteriors' sigmas, and each dimension's
    KL, the active units in blue (stats: `evaluate`'s). mu, logvar: (N, D) on the CPU.

    What should match the prior N(0, I) is q(z) = mean over images x of q(z|x), drawn here as
    z = mu + sigma * eps, one per image (seed: for eps): its variance is Var(mu) + E[sigma^2],
    so narrow posteriors (sigma << 1) can only match it if the means spread nearly as wide."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed))  # (N, D)
    ax_z, ax_sigma, ax_kl = _figure(15, 3.8).subplots(1, 3)
    variance = z.var(correction=0).item()
    _hist(ax_z, z, density=True, alpha=0.6, label=f"z ~ q(z) (variance {variance:.2f})")
    _hist(ax_z, mu, density=True, histtype="step", color="C1", label="mu, the posterior means")
    t = torch.linspace(-4, 4, 200)
    ax_z.plot(t, torch.exp(-0.5 * t**2) / math.sqrt(2 * math.pi), "k", label="prior N(0, 1)")
    ax_z.set(title="aggregate posterior q(z), all dimensions", xlabel="z", ylabel="density")
    ax_z.legend(fontsize=8)
    _hist(ax_sigma, std, alpha=0.7, label="sigma")
    ax_sigma.axvline(1.0, color="k", label="prior sigma = 1")
    ax_sigma.set(title="posterior standard deviations sigma", xlabel="sigma", ylabel="count")
    ax_sigma.legend()
    kl = torch.tensor(stats["kl_per_dim"])
    order = torch.argsort(kl, descending=True).tolist()
    active = [stats["mu_var"][d] > ACTIVE_UNIT_THRESHOLD for d in order]
    ax_kl.bar(range(len(kl)), kl[order].numpy(), color=["C0" if a else "C7" for a in active])
    shown = range(0, len(kl), 1 if len(kl) <= 32 else -(-len(kl) // 16))  # labels apart
    ax_kl.set_xticks(shown, [str(order[i]) for i in shown], fontsize=6)
    title = f"KL per dimension: {sum(active)} of {len(kl)} active (blue)"
    ax_kl.set(title=title, xlabel="latent dimension", ylabel="nats per image")
    save_figure(ax_z.figure, path)


def save_traversals(model, x, kl_per_dim, path, y=None, n_dims=8, span=3.0):
    """mu(x) of one image x (C, H, W) (label y, an int, if conditional) decoded with one dimension
    swept over [-span, span] in 11 steps, for each of the n_dims dimensions of highest KL."""
    y = None if y is None else torch.tensor([y], device=x.device)
    mu = model.encode(x[None], y)[0][0]  # (D,)
    dims = torch.argsort(torch.tensor(kl_per_dim), descending=True)[:n_dims].tolist()
    values = torch.linspace(-span, span, 11, device=mu.device)
    z = mu.repeat(len(dims), 11, 1)  # (n_dims, 11, D)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    images = model.decode(z.flatten(0, 1), None if y is None else y.expand(len(dims) * 11))
    title = "traversals of the most informative dimensions, from mu of one test image"
    rows = [f"z{d} ({kl_per_dim[d]:.1f} nats)" for d in dims]
    columns = [f"{round(v, 1) + 0.0:+.1f}" for v in values.tolist()]
    save_grid(images.view(len(dims), 11, *x.shape), path, title, rows, columns)


def save_class_means(model, mu, labels, classes, path, per_class=8, noise=0.1, seed=0):
    """For each class, the mean of its images' mu (N, D) plus noise * N(0, I), decoded (with the
    class's label for a conditional model); labels (N,) and names `classes` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    present = sorted(set(labels.tolist()))
    means = torch.stack([mu[labels == c].mean(0) for c in present])  # (classes, D)
    z = means[:, None] + noise * torch.randn(len(present), per_class, mu.shape[1], generator=g)
    device = next(model.parameters()).device
    y = torch.tensor(present, device=device).repeat_interleave(per_class)
    y = y if model.num_classes else None  # the label, to a conditional model
    images = model.decode(z.flatten(0, 1).to(device), y)  # (classes * per_class, C, H, W)
    with_label = " with the label" if model.num_classes else ""
    title = f"class means of mu + {noise} * N(0, I), decoded{with_label}"
    rows = [str(classes[c]) for c in present]
    save_grid(images.view(len(present), per_class, *images.shape[1:]), path, title, rows)


def save_latent_pca(mu, labels, classes, path):
    """The means mu (N, D) on their first two principal components, coloured by class (labels (N,)
    and names; None for unlabelled images: one colour)."""
    centered = (mu - mu.mean(0)).double()  # float64: means near 1e15 still have a variance
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    proj = torch.cat([centered @ v[:2].T, torch.zeros(len(mu), 2)], dim=1)[:, :2]  # (N, 2)
    explained = (s**2 / (s**2).sum().clamp(min=1e-300)).tolist() + [0.0]  # PC 2 is 0 when D = 1
    ax = _figure(6.5, 5.5).subplots()
    for c in sorted(set(labels.tolist())) if labels is not None else [None]:
        points = proj.T if c is None else proj[labels == c].T
        name = None if c is None else _literal(classes[c])
        ax.scatter(*points, s=2, alpha=0.5, color=f"C{(c or 0) % 10}", label=name)
    if labels is not None:
        ax.legend(markerscale=6, title="class", loc="best", fontsize=8)
    ax.set(
        title="test-set means mu, first two principal components",
        xlabel=f"PC 1 ({explained[0]:.0%} of variance)",
        ylabel=f"PC 2 ({explained[1]:.0%} of variance)",
    )
    save_figure(ax.figure, path)


@in_eval_mode
def save_error_analysis(model, images, labels, classes, out_dir, likelihood, sigma, n=16):
    """Each test image's reconstruction error -log p(x | z = mu): their histogram, the n best and
    worst reconstructed images, and per class (per_class.csv) the mean error and KL; returns those
    rows ([] without labels). images: (N, C, H, W) uint8 on the model's device; labels: (N,) on
    the CPU, or None. Returns also mu (N, D) and logvar, on the CPU, for the other figures."""
    y = labels.to(images.device) if model.num_classes else None
    out = []  # per batch: mu, logvar, error, x_hat
    for start in range(0, len(images), 1000):
        x = to_float(images[start : start + 1000])
        mu, logvar = model.encode(x, None if y is None else y[start : start + 1000])
        logits = model.decode_logits(mu, None if y is None else y[start : start + 1000])
        error = reconstruction_loss(logits, x, likelihood, sigma)
        x_hat = (torch.sigmoid(logits) * 255).round().to(torch.uint8)
        out.append([t.cpu() for t in (mu, logvar, error, x_hat)])
    mu, logvar, error, x_hat = (torch.cat(parts) for parts in zip(*out))
    ax = _figure(6.5, 4).subplots()
    _hist(ax, error)
    ax.set(title="reconstruction error per test image", xlabel="-log p(x | z = mu), nats")
    ax.set_ylabel("images")
    save_figure(ax.figure, os.path.join(out_dir, "recon_error_hist.png"))
    order = torch.argsort(error)
    best, worst = order[:n], order.flip(0)[:n]
    x = images.cpu()
    grid = torch.stack([x[best], x_hat[best], x[worst], x_hat[worst]]).float() / 255
    title = f"best and worst reconstructed test images ({error[best[0]]:.4g} to {error[worst[0]]:.4g} nats)"
    save_grid(
        grid, os.path.join(out_dir, "best_worst.png"), title, ["best", "recon", "worst", "recon"]
    )
    kl = kl_divergence(mu, logvar)
    rows = []
    for c in sorted(set(labels.tolist())) if labels is not None else ():
        m = labels == c
        row = dict(label=c, name=classes[c], count=int(m.sum()), recon_error=error[m].mean().item())
        rows.append(dict(row, kl=kl[m].mean().item()))
    if rows:
        save_csv(rows, os.path.join(out_dir, "per_class.csv"))
    return rows, mu, logvar


@in_eval_mode
def write_figures(model, test_x, test_y, classes, stats, out_dir, likelihood, sigma, seed, pair):
    """Every figure of a trained model, in out_dir; returns the per-class rows. test_x: (N, C, H, W)
    uint8 on the model's device; test_y: (N,) on the CPU, or None (no class figures then), and
    `classes` their names; stats: `evaluate`'s; likelihood, sigma: p(x|z); seed: for every random
    draw; pair = (A, B): the interpolation joins the first test images of classes A and B (else
    test images 0 and 1)."""
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    conditional = model.num_classes > 0
    label = (lambda i: int(test_y[i])) if conditional else (lambda i: None)
    rows, mu, logvar = save_error_analysis(
        model, test_x, test_y, classes, out_dir, likelihood, sigma
    )
    save_samples(
        model, path("samples_per_class.png" if conditional else "samples.png"), classes, seed
    )
    labels = [] if test_y is None else test_y.tolist()
    i, j = 0, min(1, len(test_x) - 1)
    if pair[0] != pair[1] and set(pair) <= set(labels):
        i, j = labels.index(pair[0]), labels.index(pair[1])
    elif labels:
        print(
            f"note: --interpolate {pair[0]} {pair[1]} does not name two classes that the test set "
            f"has, so interpolation.png joins test images 0 and 1"
        )
    ends = to_float(test_x[[i, j]])
    line = interpolate(model, ends[0], ends[1], 10, label(i), label(j))
    title = "interpolation: two test images, and decode(z) on the line between their mu"
    save_grid(torch.cat([ends[:1], line, ends[1:]])[None], path("interpolation.png"), title)
    save_latent_distribution(mu, logvar, stats, path("latent_distribution.png"), seed)
    save_traversals(model, ends[0], stats["kl_per_dim"], path("traversals.png"), label(i))
    if test_y is None:
        print(
            "note: the images have no class labels, so class_means.png and per_class.csv are not "
            "written and latent_pca.png has one colour"
        )
    else:
        save_class_means(model, mu, test_y, classes, path("class_means.png"), seed=seed)
    save_latent_pca(mu, test_y, classes, path("latent_pca.png"))
    if model.latent_dim == 2 and not conditional:  # decoded over [-3, 3]^2, z1 rightwards, z2 up
        z = torch.cartesian_prod(torch.linspace(3, -3, 20), torch.linspace(-3, 3, 20)).flip(1)
        images = model.decode(z.to(test_x.device)).view(20, 20, *test_x.shape[1:])  # z: (400, 2)
        save_grid(images, path("manifold.png"), "decode(z) for z1, z2 in [-3, 3], z2 upwards")
    return rows


# ---------------------------------------------------------------------------------------------
# The final report: the numbers of a trained model, and every figure


@in_eval_mode
def evaluate_nll(model, images, k, labels=None, likelihood="bernoulli", sigma=0.1, seed=0):
    """-log p(x) by `log_likelihood` with k samples, under the model's likelihood, in nats per
    image, the mean over a split. images: uint8 on the model's device; labels: for a conditional
    model, whose number is then -log p(x|y)."""
    generator = torch.Generator(images.device).manual_seed(seed)
    total = torch.zeros((), device=images.device)
    for start in range(0, len(images), 100):
        y = None if labels is None else labels[start : start + 100]
        total += log_likelihood(
            model, images[start : start + 100], k, y, likelihood, sigma, generator
        ).sum()
    return -total.item() / len(images)


def collapse_warning(kl, active_units, n_images):
    """A warning when the posterior has collapsed (Bowman et al. 2016): a test KL under 0.1 nats,
    so q(z|x) is the prior for every image; or no active unit among at least 10 images (fewer tell
    too little of a variance), so z hardly varies across them. Else None."""
    advice = "try --kl_warmup 10, --free_bits 0.5 or a smaller --beta."
    if kl < 0.1:
        return (
            f"warning: posterior collapse: the test KL is {kl:.3f} nats, so q(z|x) is the prior "
            f"for every image and the decoder ignores z; {advice}"
        )
    if active_units == 0 and n_images >= 10:
        return (
            f"warning: no active latent unit: no mean mu_u has a variance across the test images "
            f"over {ACTIVE_UNIT_THRESHOLD} (the test KL is {kl:.3f} nats), so z tells the decoder "
            f"little about each image; {advice}"
        )
    return None


def report(model, data, out_dir, likelihood, sigma, beta, seed, nll_samples, pair, extra):
    """The final evaluation, printed and saved with every figure: the test -ELBO, the loss at
    `beta` (the last epoch's), the NLL if nll_samples > 0, in nats per image; returns
    evaluation.json's dict (with `extra`'s values). data: test_x uint8 on the model's device,
    labels on the CPU or None, classes. Bits per dimension for binary pixels only: a Bernoulli
    likelihood of grey pixels is not a probability, a Gaussian one a density (the log says so)."""
    test_x = data["test_x"]
    y = data["labels"].to(test_x.device) if model.num_classes else None
    generator = torch.Generator(test_x.device).manual_seed(seed)
    te = evaluate(model, test_x, y, likelihood, sigma, generator)
    results = dict(extra, likelihood=likelihood, sigma=sigma if likelihood == "gaussian" else None)
    results.update(test_neg_elbo=te["neg_elbo"], test_recon=te["recon"], test_kl=te["kl"])
    results.update(beta=beta, test_loss=te["recon"] + beta * te["kl"])
    results.update({k: te[k] for k in ("active_units", "kl_per_dim", "mu_var")})
    binary = bool(((test_x == 0) | (test_x == 255)).all())
    note = ""
    if likelihood == "bernoulli" and not binary:
        note = " (Bernoulli on pixels that are not binary: not a probability; it compares runs of"
        note += " vae.py, and --binarize gives the standard binary protocol)"
    elif likelihood == "gaussian":
        note = f" (a Gaussian density of pixels in [0, 1] with sigma {sigma:g}: it compares"
        note += " Gaussian runs, not published likelihoods of 8-bit pixels)"
    print(
        f"test -ELBO {te['neg_elbo']:.3f} = recon {te['recon']:.3f} + kl {te['kl']:.3f} nats/image "
        f"(one z per image){note}; {te['active_units']} of {model.latent_dim} latent units active"
    )
    if beta != 1:
        print(
            f"test loss at the last epoch's beta, recon + {beta:g} kl: {results['test_loss']:.3f}"
        )
    if nll_samples > 0:
        t0 = time.perf_counter()
        nll = evaluate_nll(model, test_x, nll_samples, y, likelihood, sigma, seed)
        results.update(nll_samples=nll_samples, test_nll=nll)
        bits = ""
        if likelihood == "bernoulli" and binary:
            results["test_nll_bits_per_dim"] = nll / (test_x[0].numel() * math.log(2))
            bits = f", {results['test_nll_bits_per_dim']:.4f} bits/dim"
        what = "NLL" if y is None else "-log p(x|y)"
        took = time.perf_counter() - t0
        print(f"test {what} (K={nll_samples}): {nll:.2f} nats/image{bits} [{took:.0f} s]{note}")
    figures = (data["classes"], te, out_dir, likelihood, sigma, seed, pair)
    results["per_class"] = write_figures(model, test_x, data["labels"], *figures)
    save_json(results, os.path.join(out_dir, "evaluation.json"))
    return results


# ---------------------------------------------------------------------------------------------
# A training run


def build_model(args, num_classes=0):
    """The command line's model: --model conv, a ConvVAE whose first block has --width channels and
    --res_blocks residual blocks on each side, or mlp, an MLPVAE with hidden layers of 16 and 8
    times --width units (512 and 256 at 32)."""
    size = (args.image_size, args.channels, args.latent_dim)
    if args.model == "conv":
        return ConvVAE(*size, args.width, num_classes, args.res_blocks)
    return MLPVAE(*size, hidden=(16 * args.width, 8 * args.width), num_classes=num_classes)


def to_device(model, device, distributed=False):
    """The model on `device`, a ConvVAE in the NHWC layout (channels_last), about 25% faster on CPUs
    (oneDNN) and tensor-core GPUs, unless under DDP, whose gradient buckets expect the default
    strides. A run of one process and the evaluation of its checkpoint both use it, and so compute
    the same numbers, bit for bit."""
    model = model.to(device)
    if isinstance(model, ConvVAE) and not distributed:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_classes(model, classes, data_dir):
    """UserError when a conditional model was trained on another number of classes than `classes`."""
    if model.num_classes and model.num_classes != len(classes or ()):
        raise UserError(
            f"the model is conditional on {model.num_classes} classes, and the data in "
            f"'{data_dir}' has {len(classes or ())}; give it the data it was trained on."
        )


def train_share(model, optimizer, data, batch_size, beta, binarize, step_args, epoch, share):
    """Part 1's loop over this process's share of an epoch, with a progress bar: the epoch's mean
    [loss, recon, kl] (3,) on the device. Under torchrun (share: rank, world, seed) one order,
    seeded by the epoch, is padded so that each process takes as many steps, and dealt by rank."""
    from tqdm import tqdm

    images = data["train_x"]
    n = len(images)
    rank, world, seed = share
    if world == 1:
        order = torch.randperm(n, device=images.device)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        order = torch.cat([order, order[: -n % world]])[rank::world].to(images.device)
    model.train()
    sums = torch.zeros(3, device=images.device)  # summed on the device, read once by the caller
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty()):
        idx = order[start : start + batch_size]  # (B,)
        x = get_batch(images, idx, binarize)  # (B, C, H, W) in [0, 1]
        y = None if data["train_y"] is None else data["train_y"][idx]
        stats = train_step(model, optimizer, x, beta, y, **step_args)
        sums += torch.stack([stats["loss"], stats["recon"], stats["kl"]]) * len(idx)
    return sums / len(order)


# The settings a resumed run may change; everything else comes from its checkpoint. A run of the
# ELBO resumed with --iwae_samples K goes on under the tighter bound (the longer recipe's last piece).
RESUMABLE = "epochs lr grad_clip data_dir device deterministic nll_samples iwae_samples".split()
RUN_STATE = {"config", "epoch", "history", "optimizer", "rng"}  # what a run saves beside the model


def resume_config(args, explicit):
    """(settings, model, checkpoint) of a resumed run: the saved settings, with the flags of
    RESUMABLE that the command line writes out (`explicit`)."""
    path = os.path.join(args.out_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(
            f"--resume found no checkpoint.pt in '{args.out_dir}'; start the run without "
            f"--resume, or point --out_dir at the run's folder."
        )
    model, state = load_checkpoint(path)
    if not RUN_STATE <= set(state):
        raise UserError(f"'{path}' holds a model but not a training run to resume.")
    config = dict(state["config"], resume=True, overwrite=False, out_dir=args.out_dir)
    config.update({k: getattr(args, k) for k in RESUMABLE if k in explicit})
    args = argparse.Namespace(**config)
    if iwae_with_a_beta(args):
        raise UserError(
            f"the run in '{args.out_dir}' trains with --beta, --free_bits or --kl_warmup, which "
            f"the IWAE bound has not; resume it without --iwae_samples."
        )
    if state["epoch"] >= args.epochs:
        raise UserError(
            f"the run in '{args.out_dir}' has finished epoch {state['epoch']} of "
            f"{args.epochs}; give --resume a larger --epochs to train further."
        )
    return args, model, state


def restore(state, optimizer, args, device, rank, world):
    """Go on from a resumed run's checkpoint: Adam's state and the random generators, so that on a
    CPU the run ends bit for bit as the uninterrupted one does (the checkpoint holds rank 0's
    generators; the other processes get their own). Returns the metrics' rows so far."""
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if rank > 0:
        torch.manual_seed(args.seed + rank + world * state["epoch"])
    changed = [k for k in RESUMABLE if getattr(args, k) != state["config"].get(k)]
    but = ", ".join(f"--{k} {getattr(args, k)}" for k in changed)
    print(
        f"resuming at epoch {state['epoch'] + 1} of {args.epochs} with the saved settings"
        f"{f' but {but}' if but else ''}"
    )
    return state["history"]


def train(args, explicit=()):
    """A run of the command line, in its order: load the data, build or restore the model, and for
    each epoch train, evaluate and log, save; then the final report. Returns the metrics' rows.
    Under torchrun each process runs this, and rank 0 alone prints and writes. explicit: the flags
    written on the command line (a resumed run takes those of RESUMABLE)."""
    model = state = None
    if args.resume:
        args, model, state = resume_config(args, explicit)
    else:
        refuse_other_run(args.out_dir, args.overwrite)
    device = select_device(args.device, args.deterministic)
    with process_group(device) as (rank, world, device):
        with contextlib.redirect_stdout(sys.stdout if rank == 0 else io.StringIO()):
            if args.batch_size % world:
                raise UserError(
                    f"--batch_size {args.batch_size} is the batch of all {world} processes "
                    f"together, so it must be a multiple of {world}."
                )
            torch.manual_seed(args.seed + rank)  # rank 0 draws what a single process would
            data = load_data(vars(args), device)
            args.channels = data["train_x"].shape[1]
            args.image_size = data["train_x"].shape[-1]
            if rank == 0:  # the data is good: now the folder may be made, an earlier run cleared
                lock = prepare_output_dir(args.out_dir, args.overwrite, args.resume)  # noqa: F841
            num_classes = len(data["classes"]) if args.conditional else 0
            model = build_model(args, num_classes) if model is None else model
            check_classes(model, data["classes"], args.data_dir)
            model = to_device(model, device, distributed=dist.is_initialized())
            # The fused Adam updates every parameter in one kernel, not a dozen per tensor.
            fused = device.type in ("cuda", "cpu")
            optimizer = torch.optim.Adam(model.parameters(), args.lr, fused=fused)
            print(
                f"{args.model} VAE{f' conditional on {num_classes} classes' if num_classes else ''}, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters, latent_dim "
                f"{args.latent_dim}, {len(data['train_x']):,} train / {len(data['test_x']):,} test "
                f"{args.dataset} images of {args.channels}x{args.image_size}x{args.image_size}"
                f"{' binarized' if args.binarize else ''}, device {device}"
                f"{f' x {world} processes' if world > 1 else ''}, writing to {args.out_dir}",
                flush=True,
            )
            history = [] if state is None else restore(state, optimizer, args, device, rank, world)
            config = dict(vars(args), num_classes=num_classes, classes=data["classes"])
            if rank == 0:
                save_json(config, os.path.join(args.out_dir, "config.json"))
            train_epochs(args, model, optimizer, data, history, config, rank, world)
    if rank == 0:  # the final evaluation on the whole test set, by one process
        plot_losses(history, os.path.join(args.out_dir, "loss_curves.png"))
        settings = (args.likelihood, args.sigma, history[-1]["beta"], args.seed, args.nll_samples)
        extra = dict(epoch=history[-1]["epoch"])
        report(model, data, args.out_dir, *settings, args.interpolate, extra)
    return history


def train_epochs(args, model, optimizer, data, history, config, rank, world):
    """The epoch loop: each process trains its share (DDP averages the gradients), then rank 0
    evaluates, logs and saves, adding the epoch's row to `history`. Ctrl-C stops it with one
    sentence (exit code 130), a non-finite loss with another (exit code 1); the last good
    checkpoint stays."""
    device = data["train_x"].device
    step_model = model
    if dist.is_initialized():  # under torchrun, even with one process
        step_model = nn.parallel.DistributedDataParallel(
            model, [device] if device.type == "cuda" else None
        )
    step_args = dict(likelihood=args.likelihood, sigma=args.sigma, free_bits=args.free_bits)
    step_args.update(grad_clip=args.grad_clip, iwae_samples=args.iwae_samples)
    saved = epoch = len(history)
    for group in optimizer.param_groups:  # a resumed run may be given another --lr
        group["lr"] = group["initial_lr"] = args.lr
    scheduler = None
    if args.lr_schedule == "cosine":  # at a resumed run's epoch, on the curve of its --epochs
        scheduler = cosine_decay(optimizer, args.epochs, last_epoch=saved - 1)
    try:
        for epoch in range(saved + 1, args.epochs + 1):
            t0 = time.perf_counter()
            beta = beta_schedule(epoch, args.beta, args.kl_warmup)
            step = (args.batch_size // world, beta, args.binarize, step_args)
            means = train_share(step_model, optimizer, data, *step, epoch, (rank, world, args.seed))
            if world > 1:  # every process took as many images: the mean of their means
                dist.all_reduce(means)
                means /= world
                for buffer in model.buffers():  # BatchNorm's statistics of rank 0, as DDP does
                    dist.broadcast(buffer, src=0)
            train_loss = means.tolist()  # waits for the device: the epoch's steps are done
            if rank == 0:  # the test set is small: rank 0 evaluates it alone
                row = dict(epoch=epoch, beta=beta, lr=optimizer.param_groups[0]["lr"])
                history.append(log_epoch(args, model, data, row, train_loss, t0, saved))
                save_epoch(model, optimizer, data, history, config, args.out_dir, args.epochs)
                saved = epoch
            if scheduler is not None:
                scheduler.step()
    except KeyboardInterrupt:
        hint = f"; continue with: python vae.py --resume --out_dir {args.out_dir}" if saved else ""
        raise UserError(
            f"stopped by Ctrl-C in epoch {epoch}; {kept(args.out_dir, saved)}{hint}", 130
        ) from None


def kept(out_dir, epoch):
    """What a stopped run has kept, for the sentence that stops it."""
    if epoch:
        return f"the checkpoint of epoch {epoch} in '{out_dir}' is intact"
    return "no epoch had finished, so no checkpoint was written"


def log_epoch(args, model, data, row, train_loss, t0, saved):
    """The epoch's metrics row, completed with the training means (train_loss: recon + beta kl, or
    minus the IWAE bound), the test -ELBO of the weights (z drawn from a generator seeded --seed)
    and the time since t0; printed as one line, with the collapse warning if it applies.
    UserError (exit code 1) when a loss is not finite."""
    generator = torch.Generator(data["test_x"].device).manual_seed(args.seed)
    te = evaluate(model, data["test_x"], data["test_y"], args.likelihood, args.sigma, generator)
    if not all(map(math.isfinite, (*train_loss, te["neg_elbo"]))):
        raise UserError(
            f"the loss became non-finite in epoch {row['epoch']} (train {train_loss[0]:.4g}, test "
            f"-ELBO {te['neg_elbo']:.4g}), so training stopped; {kept(args.out_dir, saved)}; try "
            f"a lower --lr (now {args.lr:g}) or --grad_clip 10.",
            1,
        )
    k = args.iwae_samples
    row.update(objective="elbo" if k == 1 else f"iwae{k}")
    row.update(zip(("train_loss", "train_recon", "train_kl"), train_loss))
    row.update(test_neg_elbo=te["neg_elbo"], test_recon=te["recon"], test_kl=te["kl"])
    row.update(test_active_units=te["active_units"], seconds=time.perf_counter() - t0)
    row.update(images_per_sec=len(data["train_x"]) / row["seconds"])
    print(
        f"epoch {row['epoch']:3d}/{args.epochs} | beta {row['beta']:.3f} | train "
        f"{'loss' if k == 1 else f'-IWAE{k}'} {row['train_loss']:8.3f} recon "
        f"{row['train_recon']:8.3f} kl {row['train_kl']:7.3f} | test -ELBO "
        f"{row['test_neg_elbo']:8.3f} recon {row['test_recon']:8.3f} kl {row['test_kl']:7.3f} | AU "
        f"{row['test_active_units']:3d} | {row['seconds']:6.2f} s {row['images_per_sec']:7.0f} img/s",
        flush=True,
    )
    warning = collapse_warning(te["kl"], te["active_units"], len(data["test_x"]))
    if warning:
        print(warning, flush=True)
    return row


def save_epoch(model, optimizer, data, history, config, out_dir, epochs):
    """The epoch's files: metrics.csv, the checkpoint and, at epochs 1, 5, 15 and the last, the
    reconstructions of the first 16 test images."""
    epoch = history[-1]["epoch"]
    if epoch in (1, 5, 15, epochs):
        y = None if data["test_y"] is None else data["test_y"][:16]
        path = os.path.join(out_dir, f"reconstructions_epoch{epoch:03d}.png")
        title = f"epoch {epoch}: test images and their reconstructions"
        save_reconstructions(model, to_float(data["test_x"][:16]), path, title, y)
    save_csv(history, os.path.join(out_dir, "metrics.csv"))
    rng = dict(cpu=torch.get_rng_state(), cuda=[])
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = dict(optimizer=optimizer.state_dict(), epoch=epoch, config=config, history=history)
    save_checkpoint(os.path.join(out_dir, "checkpoint.pt"), model, rng=rng, **state)


# ---------------------------------------------------------------------------------------------
# Evaluating a saved model

# The flags that checkpoint mode uses; it names any other flag given as ignored. A file of
# `save_model` without a run's settings is evaluated with MODEL_FILE_FLAGS too.
CHECKPOINT_FLAGS = {"checkpoint", "data_dir", "out_dir", "nll_samples", "interpolate", "device"}
CHECKPOINT_FLAGS |= {"seed", "deterministic", "overwrite"}
MODEL_FILE_FLAGS = {"dataset", "binarize", "likelihood", "sigma", "beta"}


def evaluate_checkpoint(args, explicit=()):
    """`--checkpoint PATH`: `report`'s files, reconstructions.png and a run's loss curves for a
    saved model, trained no further; returns the results. Its settings come from the checkpoint
    (for a `save_model` file, from MODEL_FILE_FLAGS, which a note names), the data from --data_dir
    and the draws from --seed (defaults: the run's), the files go to --out_dir (default: eval/)."""
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.checkpoint), "eval")
    if {"checkpoint.pt", "metrics.csv"} & set(run_files(out_dir)):  # not even with --overwrite
        raise UserError(
            f"'{out_dir}' holds a training run, which an evaluation must not change; leave "
            f"--out_dir out (eval/ beside the checkpoint) or choose another folder."
        )
    refuse_other_run(out_dir, args.overwrite, training=False)
    device = select_device(args.device, args.deterministic)
    model, state = load_checkpoint(args.checkpoint, device)
    model = to_device(model, device)
    run = RUN_STATE <= set(state)
    ignored = set(explicit) - CHECKPOINT_FLAGS - (set() if run else MODEL_FILE_FLAGS)
    if ignored:
        flags = ", ".join(sorted(f"--{k}" for k in ignored))
        print(
            f"note: --checkpoint evaluates the saved model as it was trained, so it ignores {flags}"
        )
    config = {**vars(args), **(state["config"] if run else {}), "out_dir": out_dir}
    config.update(
        {k: getattr(args, k) for k in ("interpolate", "seed", "data_dir") if k in explicit}
    )
    config.update(
        image_size=model.image_size, channels=model.channels, conditional=model.num_classes > 0
    )
    config["data_dir"] = config["data_dir"] or default_data_dir(config["dataset"])
    if not run:
        print(
            f"note: '{args.checkpoint}' holds a model without a training run's settings, so it is "
            f"evaluated with --dataset {config['dataset']}{' --binarize' if config['binarize'] else ''}"
            f" --likelihood {config['likelihood']} --sigma {config['sigma']} --beta {config['beta']}"
        )
    data = load_data(config, device)
    check_classes(model, data["classes"], config["data_dir"])
    lock = prepare_output_dir(out_dir, args.overwrite, training=False)  # noqa: F841 (held)
    epoch = state.get("epoch")
    print(
        f"{type(model).__name__} from {args.checkpoint} (epoch {epoch}), device {device}, writing to {out_dir}"
    )
    path = os.path.join(out_dir, "reconstructions.png")
    y = None if data["test_y"] is None else data["test_y"][:16]
    save_reconstructions(
        model, to_float(data["test_x"][:16]), path, "test images and their reconstructions", y
    )
    if run:
        plot_losses(state["history"], os.path.join(out_dir, "loss_curves.png"))
    beta = state["history"][-1]["beta"] if run else config["beta"]
    settings = (config["likelihood"], config["sigma"], beta, config["seed"], args.nll_samples)
    extra = dict(checkpoint=args.checkpoint, epoch=epoch)
    return report(model, data, out_dir, *settings, config["interpolate"], extra)


# ---------------------------------------------------------------------------------------------
# The command line
#
# Each flag's default is in its definition below, and --help prints it; --data_dir's and
# --out_dir's depend on other flags, and `parse_args` sets them. A bad value gets one sentence
# from argparse (exit code 2) before anything is read or written. Abbreviations are off: --epoch
# for --epochs is easy to misread, and --resume takes only the flags written out in full.


def in_range(kind, low, high):
    """An argparse type: a number of `kind` (int or float) from low to high. Its name is the range,
    which a flag's help shows as %(type)s."""

    def parse(text):
        with contextlib.suppress(ValueError):  # not a number
            if low <= kind(text) <= high:  # also false for nan
                return kind(text)
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what} from {low} to {high}, got '{text}'")

    parse.__name__ = f"{low} to {high}"
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those helps say what it is
        shown = action.default is not None and action.default is not False
        return super()._get_help_string(action) if shown else action.help


def build_parser():
    """The command line: every flag with its default and range, in one place (README.md says more)."""
    p = argparse.ArgumentParser(prog="vae.py", formatter_class=HelpFormatter, allow_abbrev=False)
    p.description = "Train a VAE on MNIST, another dataset or your own images and write its "
    p.description += "figures, or evaluate a saved one (--checkpoint); under torchrun, in parallel."
    add = p.add_argument_group("data").add_argument
    add("--dataset", choices=DATASETS, default="mnist", help="folder: your images")
    add("--data_dir", help="default ./mnist for mnist, ./data for the others")
    add("--image_size", type=int, choices=IMAGE_SIZES, help="default: the data's")
    add("--channels", type=int, choices=(1, 3), help="default: the data's")
    add("--binarize", action="store_true", help="the binary likelihood protocol")
    add = p.add_argument_group("model and objective").add_argument
    add("--model", choices=("conv", "mlp"), default="conv", help="ConvVAE or MLPVAE")
    add("--latent_dim", type=in_range(int, 1, 4096), default=32, help="%(type)s")
    add("--width", type=in_range(int, 1, 1024), default=32, help="1st layer, %(type)s")
    add("--res_blocks", type=in_range(int, 0, 8), default=1, help="conv, %(type)s")
    add("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli", help="p(x|z)")
    add("--sigma", type=in_range(float, 0.001, 100.0), default=0.1, help="gaussian's, %(type)s")
    add("--beta", type=in_range(float, 0.0, 10000.0), default=1.0, help="KL weight, %(type)s")
    add("--kl_warmup", type=in_range(int, 0, 100000), default=0, help="epochs, %(type)s")
    add("--free_bits", type=in_range(float, 0.0, 100.0), default=0.0, help="nats, %(type)s")
    add("--iwae_samples", type=in_range(int, 1, 1000), default=1, help="K, 1: ELBO, %(type)s")
    add("--conditional", action="store_true", help="a conditional VAE (labels)")
    add = p.add_argument_group("training").add_argument
    add("--epochs", type=in_range(int, 0, 100000), default=30, help="%(type)s")
    add("--batch_size", type=in_range(int, 1, 65536), default=128, help="%(type)s")
    add("--lr", type=in_range(float, 1e-8, 10.0), default=2e-3, help="%(type)s")
    add("--lr_schedule", choices=("constant", "cosine"), default="cosine", help="per epoch")
    add("--seed", type=in_range(int, 0, 2**32 - 1), default=0, help="%(type)s")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: best")
    add("--grad_clip", type=in_range(float, 0.0, 1e6), default=0.0, help="norm, %(type)s")
    add("--deterministic", action="store_true", help="repeatable CUDA runs, slower")
    add("--resume", action="store_true", help="continue the run in --out_dir")
    add("--overwrite", action="store_true", help="replace the run in --out_dir")
    add = p.add_argument_group("evaluation and outputs").add_argument
    add("--nll_samples", type=in_range(int, 0, 100000), default=0, help="K, %(type)s")
    add("--checkpoint", metavar="PATH", help="evaluate this saved model; no training")
    add("--out_dir", help="default runs/<model>, or eval/ beside a --checkpoint")
    add("--interpolate", type=int, nargs=2, default=[4, 9], metavar=("A", "B"), help="classes")
    return p


def iwae_with_a_beta(args):
    """Whether settings ask for the IWAE bound (--iwae_samples > 1) with a KL weight other than 1
    (--beta, --free_bits, --kl_warmup), which that bound has not: a fresh run or a resumed one."""
    return args.iwae_samples > 1 and (args.beta != 1 or args.free_bits or args.kl_warmup)


def parse_args(argv=None):
    """Parse and cross-check the command line; a bad combination exits with code 2 and one sentence."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (args.overwrite or args.checkpoint):
        parser.error(
            "--resume continues the run in --out_dir: not with --overwrite or --checkpoint"
        )
    if iwae_with_a_beta(args):
        parser.error(
            "--iwae_samples trains the IWAE bound, which has no --beta, --free_bits or --kl_warmup"
        )
    if args.checkpoint is None and args.epochs == 0:
        parser.error("--epochs 0 trains nothing; to evaluate a saved model, give --checkpoint PATH")
    if args.checkpoint is None:
        args.out_dir = args.out_dir or os.path.join("runs", args.model)
        if args.data_dir is None and not args.resume:
            if args.dataset == "folder":
                parser.error("--dataset folder needs --data_dir, the folder of images")
            args.data_dir = default_data_dir(args.dataset)
    return args


def main(argv=None):
    """Run the command line with argv (default sys.argv[1:]): train (returns the metrics' rows) or,
    with --checkpoint, evaluate a saved model (returns its results). A stop prints one sentence to
    stderr and raises SystemExit: 2 for bad input, 1 for any other stop, 130 for Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    words = {w.split("=")[0] for w in argv if w.startswith("--")}
    explicit = {a.dest for a in build_parser()._actions if words & set(a.option_strings)}
    try:
        return evaluate_checkpoint(args, explicit) if args.checkpoint else train(args, explicit)
    except (UserError, KeyboardInterrupt, OSError, MemoryError, RuntimeError) as e:
        message, code = stop_sentence(e)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the others would say it again
            print(f"vae.py: error: {message}", file=sys.stderr)
        raise SystemExit(code) from None


def stop_sentence(e):
    """(the sentence, the exit code) of an exception that stops a run; raises it again when it is
    a RuntimeError other than running out of memory (a bug, whose traceback should show)."""
    if isinstance(e, UserError):
        return str(e), e.exit_code
    if isinstance(e, KeyboardInterrupt):  # outside the training loop
        return "interrupted.", 130
    if isinstance(e, OSError):  # a file or folder that cannot be read
        return f"cannot read or write '{e.filename}' ({e.strerror or e}).", 1
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e):
        return (
            "memory ran out (the images, the model or a batch); use a smaller --batch_size, "
            "--image_size or --width, or fewer images; a checkpoint already written is intact.",
            1,
        )
    raise e


if __name__ == "__main__":
    main()
