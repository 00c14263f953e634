"""
A Variational Autoencoder in one file of PyTorch, to read, to copy and to run.

This first part is the VAE: the models, the loss, a training step and loop, evaluation, the
log-likelihood, sampling, interpolation, saving and loading. It needs only torch, 1.13 or later
(for torch.load's weights_only), and Python 3.9: copied alone into a file of your own, it is a
complete VAE. In vae.py a command-line tool follows it, which trains on MNIST or your images and
draws what the model learned:

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
## in [0, 255] or floats in [0, 1], a batch (B, C, H, W) (or one (C, H, W) for interpolate), and
## `to_float` turns the first into the second. Their range is checked once, where a dataset
## enters (`train_epoch`, `evaluate`, `log_likelihood`), the same way on every device: a check in
## the forward pass would be a branch on the data's values, which torch.compile and torch.export
## cannot follow, and on a GPU it would make the CPU wait for every batch. Functions of one batch
## return tensors and leave them on the device (train_step's numbers, the models' outputs), so
## that a GPU never waits for the CPU to read a number; functions of a whole epoch or split
## (train_epoch, evaluate) read their sums at the end, not per batch, and return Python numbers. Every loss
## is in nats (natural logarithms; divide by ln 2 for bits) per image.


def to_float(images):
    """uint8 images in [0, 255] -> float32 in [0, 1]; other images are returned as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def check_images(images):
    """ValueError unless `images` are uint8 or floats in [0, 1]: under a Bernoulli likelihood
    0-255 floats give a loss with no lower bound, and the logits run off to infinity. It reads
    the range, which waits for the device: call it once per dataset, not per batch."""
    if images.dtype != torch.uint8 and images.numel():
        low, high = torch.aminmax(images)  # one pass
        if low < 0 or high > 1:
            raise ValueError(
                f"images must be uint8 in [0, 255] or floats in [0, 1], got {images.dtype} from "
                f"{low.item():g} to {high.item():g}; divide 0-255 images by 255, or clamp images "
                f"that a resize took a little outside [0, 1] with x.clamp(0, 1)"
            )


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
    `load_model` rebuilds it as `cls(**model_args)` (your own subclass: `load_model(f, cls=...)`).

    Conditional VAE (Sohn, Lee & Yan 2015, Sec. 3), when num_classes > 0: the encoder
    q(z|x, y) and the decoder p(x|z, y) also see the one-hot label y, appended to the
    encoder's features and to z; the prior stays N(0, I). Told the class, the decoder no
    longer needs z for it, so z holds the style (slant, thickness). One-hot, not the class index
    as a number, which would put the classes in an order with distances between them. Labels y,
    in every function: an int (one class for the whole batch), (B,) class indices, or (B,
    num_classes) probabilities (one-hot, or a mixture, as `interpolate` makes); an unconditional
    model refuses them, a conditional one needs them (ValueError).
    """

    def __init__(self, image_size, channels, latent_dim, num_classes=0):
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        # the constructor's arguments as plain values, from which `load_model` rebuilds the model
        self.model_args = dict(image_size=image_size, channels=channels, latent_dim=latent_dim)
        self.model_args.update(num_classes=num_classes)

    def with_label(self, h, y):
        """h (B, n) -> (B, n + num_classes), the one-hot y appended (h if unconditional)."""
        if not self.num_classes:
            if y is not None:  # ignored, they would hide that the model was built without classes
                raise ValueError("this VAE is unconditional (num_classes 0): it takes no labels y")
            return h
        if y is None:
            raise ValueError("this conditional VAE needs the class labels y")
        y = torch.as_tensor(y, device=h.device).expand(len(h)) if isinstance(y, int) else y
        onehot = y if y.ndim == 2 else F.one_hot(y.long(), self.num_classes)  # (B, K)
        return torch.cat([h, onehot.to(h.dtype)], dim=1)

    def encode(self, x, y=None):
        """x: (B, C, H, W) images (see `to_float`) -> mu, logvar: (B, latent_dim), logvar within
        LOGVAR_RANGE."""
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
        p = next(self.parameters())  # z on the model's device, in its dtype
        z = torch.randn(n, self.latent_dim, device=p.device, dtype=p.dtype, generator=generator)
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
    and the stride divides the kernel, which reduces the decoder's checkerboard pattern; the cap
    on channels bounds the parameters; BatchNorm lets the stack train fast at a high learning
    rate (its cost: train and eval mode differ, see `in_eval_mode`); LeakyReLU keeps a gradient
    for the negative half of the activations that BatchNorm centres on 0.

    image_size: H = W, a multiple of 4 and at least 16 (else ValueError); channels: C (1 or 3,
    any works); latent_dim: size of z; num_classes: K > 0 for a conditional VAE (see `VAE`);
    res_blocks: residual blocks on each side (0 for the plainest model; 1, the default, is worth
    its cost: see `ResidualBlock`).
    """

    def __init__(
        self,
        image_size=28,
        channels=1,
        latent_dim=32,
        base_channels=32,
        num_classes=0,
        res_blocks=1,
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
        binary x. A Bernoulli gives probability to 0 and 1 alone; for a grey x the formula
        -x log p - (1 - x) log(1 - p) is a cross-entropy, whose least value is not 0 but the
        entropy of x (0.69 nats at x = 0.5): it compares runs, not likelihoods.
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
    x: uint8 or floats in [0, 1] (see `to_float`); sigma > 0. ValueError for another likelihood.
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
    look worse. beta = 0 is a plain autoencoder with noise. Runs with different betas compare by
    their -ELBO, recon + kl (`evaluate`'s), not by their losses, each weighted by its own beta.

    With free_bits = L > 0, the KL term becomes sum_j max(L, KL_j), KL_j the batch mean of
    dimension j's KL (Kingma et al. 2016, arXiv:1606.04934, eq. 15): a dimension under L
    nats is not pushed towards the prior, which keeps dimensions from collapsing early. The
    floor can only raise the KL term, so at beta >= 1 the loss is still an upper bound on
    -log p(x), a looser one; the kl it returns stays the true one.

    Args:
        recon_logits: (B, C, H, W) the decoder's logits, `model(x)[0]`.
        x: (B, C, H, W) the images, uint8 or floats in [0, 1] (see `to_float`).
        mu, logvar: (B, latent_dim) from `model.encode`.
        beta: weight of the KL term (a float or a 0-dim tensor); 1 for the ELBO.
        likelihood, sigma: p(x|z), see `reconstruction_loss`.
        free_bits: L, nats per latent dimension.

    Returns (loss, recon, kl): scalar tensors in nats per image, float32 (under autocast too);
    loss == recon + beta * kl when free_bits is 0, and kl is always the true KL. ValueError for
    an unknown likelihood; beta and free_bits are checked by `train_step`.
    """
    rec = reconstruction_loss(recon_logits, x, likelihood, sigma).mean()
    kl_dims = kl_per_dimension(mu.float(), logvar.float()).mean(0)  # (D,) batch means
    kl = kl_dims.sum()
    kl_term = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return rec + beta * kl_term, rec, kl


# ---------------------------------------------------------------------------------------------
# Training
#
## The training set is one tensor in memory (MNIST: 60,000 x 28 x 28 bytes, 47 MB), batched by
## a shuffled index: no DataLoader, whose per-image Python work outlasts the model on a GPU.
## Kept as uint8 (4x smaller than float32), the images become floats a batch at a time. This
## stops working when the images outgrow the device's memory (ImageNet's 1.3 million at 64 x 64
## are 16 GB) or want a random crop per image: then a DataLoader feeds `train_step` the batches.


def get_batch(images, idx, binarize=False):
    """images[idx] as floats (B, C, H, W) in [0, 1]. With binarize, each pixel is drawn as
    Bernoulli(intensity) afresh on every call: the dynamic binarization of Burda et al.
    (2015), under which the Bernoulli likelihood is a true likelihood of binary images. Drawn
    afresh, it also acts as data augmentation (one fixed binarization overfits sooner); the test
    images are to be binarized once (seeded), so that their numbers are likelihoods of fixed
    binary images."""
    x = to_float(images[idx])
    return torch.bernoulli(x) if binarize else x


def train_step(
    model, optimizer, x, y=None, *, beta=1.0, grad_clip=0.0, iwae_samples=1, **loss_args
):
    """One optimizer step on a batch of images x (B, C, H, W) (labels y if conditional), the model
    in train mode. beta, **loss_args (likelihood, sigma, free_bits): see `vae_loss`. K =
    iwae_samples > 1 trains `iwae_loss` with K samples instead, which has no beta or free bits.
    grad_clip > 0 first rescales the gradient to at most that global L2 norm. ValueError for a
    negative beta or free_bits, or either with iwae_samples > 1 (where they would be ignored).

    Returns a dict of detached 0-dim tensors, left on the device: loss (the loss minimised: recon +
    beta * kl, each KL_j floored at free_bits, or minus the IWAE bound), recon and kl (the true KL)
    in nats per image, and grad_norm, the gradient's norm before any clipping, for a caller to log
    (a norm that grows by orders of magnitude, or turns inf or nan, is the first sign of a
    diverging run).
    """
    free_bits = loss_args.get("free_bits", 0.0)
    if beta < 0 or free_bits < 0 or (iwae_samples > 1 and (beta != 1 or free_bits)):
        raise ValueError(
            f"train_step needs beta >= 0 and free_bits >= 0, and beta 1 and no free bits for the "
            f"IWAE bound; got beta {beta}, free_bits {free_bits}, iwae_samples {iwae_samples}"
        )
    model.train()  # BatchNorm normalises by the batch's statistics and updates its running ones
    if iwae_samples > 1:
        loss_args.pop("free_bits", None)  # 0, as checked
        loss, rec, kl = iwae_loss(model, x, iwae_samples, y, **loss_args)
    else:
        logits, mu, logvar = model(x, y)
        loss, rec, kl = vae_loss(logits, x, mu, logvar, beta, **loss_args)
    optimizer.zero_grad(set_to_none=True)  # gradients accumulate in .grad until cleared
    loss.backward()
    # a rare huge gradient would also swell Adam's moments for many steps; with grad_clip 0 the
    # largest norm is infinite, and clip_grad_norm_ only returns the norm
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    optimizer.step()
    stats = dict(loss=loss, recon=rec, kl=kl, grad_norm=grad_norm)
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
    epochs)) / 2, from the optimizer's lr down to 0.003 lr at the last of 30, and 0 after, where
    it stays (Loshchilov & Hutter 2017, SGDR, eq. 5, one cycle). Why decay: at a constant rate,
    Adam's steps keep the weights moving about a minimum, by a distance that scales with lr; a
    falling rate lets them settle into it. last_epoch = k - 1 goes on after epoch k, once each
    group's "initial_lr" is set to the lr (torch's schedulers need it)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: (1 + math.cos(math.pi * min(e, epochs) / epochs)) / 2, last_epoch
    )


def train_epoch(
    model, optimizer, images, labels=None, *, batch_size=128, beta=1.0, binarize=False, **step_args
):
    """One pass over `images` in a random order: the training loop. A whole run is

        scheduler = cosine_decay(optimizer, epochs)
        for epoch in range(1, epochs + 1):
            train_epoch(model, optimizer, images, beta=beta_schedule(epoch, beta, kl_warmup))
            scheduler.step()

    (ConvVAE(res_blocks=1), Adam with lr 2e-3, the cosine decay and beta 1 fit MNIST in 30 epochs).

    images: (N, C, H, W) uint8, or float in [0, 1] (else ValueError), on the model's device;
    labels: (N,) there, for a conditional model; beta, binarize, **step_args (likelihood, sigma,
    free_bits, grad_clip, iwae_samples): see `train_step` and `get_batch`.

    Returns a dict of the epoch's means, in nats per image: loss (as `train_step`'s), recon and kl.
    """
    check_images(images)
    order = torch.randperm(len(images), device=images.device)  # new batches each epoch
    sums = torch.zeros(3, device=images.device)  # summed on the device, read once at the end
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]  # (B,)
        x = get_batch(images, idx, binarize)  # (B, C, H, W) in [0, 1]
        y = None if labels is None else labels[idx]
        stats = train_step(model, optimizer, x, y, beta=beta, **step_args)
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
    """The test -ELBO, its recon and KL, over a split, in eval mode, with z sampled from q(z|x):
    the ELBO is an expectation over q(z|x), as in training. Decoding mu instead would give a
    smaller recon (a code without noise decodes best), and the sum would bound nothing.

    images: (N, C, H, W) uint8, or float in [0, 1] (else ValueError), on the model's device;
    labels: (N,) there, for a conditional model; likelihood, sigma: p(x|z), see
    `reconstruction_loss`; generator: for z (default: seeded 0). Returns a dict: neg_elbo (recon
    + kl), recon, kl: nats per image, the mean over images; kl_per_dim: the KL per latent
    dimension; mu_var: for each dimension u, the variance of mu_u across images; active_units:
    how many dimensions have mu_var > ACTIVE_UNIT_THRESHOLD.
    """
    check_images(images)
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
    active_units = int((mu_var > ACTIVE_UNIT_THRESHOLD).sum())
    stats = dict(neg_elbo=rec + kl, recon=rec, kl=kl, kl_per_dim=kl_per_dim.tolist())
    return stats | dict(mu_var=mu_var.tolist(), active_units=active_units)


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
    K = 1 is the ELBO, estimated with a sampled KL, log q(z_k|x) - log p(z_k) of each draw: the
    log of the mean of the w_k does not split into a reconstruction and a KL. The ELBO alone
    (`evaluate`, `vae_loss`) takes the KL in closed form, exact where a sample would add noise,
    which two Gaussians allow; a prior or posterior without one (a mixture, a flow) would sample
    it there too. Why it rises with K, in expectation (Burda et al., Thm. 1): the mean of K
    weights is the average of the means of its subsets of K - 1, so by Jensen again the bound
    with K is at least the bound with K - 1. And it reaches log p(x) as K -> infinity: the mean
    of the w_k then converges to p(x) itself (for bounded w_k), and the first gap closes.

    Args:
        model: a module with `encode`, `decode_logits` and `latent_dim`; it runs in eval mode.
        x: (B, C, H, W) uint8 or in [0, 1] (see `to_float`); binary for a true Bernoulli
            likelihood.
        k: the number of importance samples, >= 1 (else ValueError); decoded in chunks of
            about max_decodes images, since K * B decodes at once (1000 x 100) fill any memory.
        y: labels for a conditional model (see `VAE`), whose estimate is then of log p(x|y).
        likelihood, sigma: p(x|z) as the model was trained with it (`reconstruction_loss`), or
            for a model of your own a function (logits, x) -> (N,) log p(x|z) (not minus it).
        generator: for the z_k (default: seeded 0).

    Returns:
        (B,) estimates of log p(x) in nats (the NLL is minus them). ValueError: x out of
        range, an unknown likelihood.
    """
    if k < 1:
        raise ValueError(f"log_likelihood needs k >= 1 importance samples, got {k}")
    check_images(x)
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
    labels = () if y is None else (y if isinstance(y, int) else torch.cat([y] * k),)  # z's order
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
    x: (B, C, H, W) uint8 or in [0, 1]; k >= 1; y, likelihood, sigma: see `log_likelihood`. It
    calls the model's encode and decode_logits, not its forward, the one method whose gradients
    DistributedDataParallel's wrapper averages: under it, pass the wrapper's .module and average
    the gradients yourself (a hook on each parameter)."""
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
    images are decode(mu(x_a)) and decode(mu(x_b)). A conditional model takes both labels y_a,
    y_b (ints), and its one-hot label moves from y_a to y_b along with z; an unconditional one
    refuses them. ValueError when x_a or x_b is not one image, or for labels as `VAE` says.
    """
    ends = []
    for x in (x_a, x_b):
        if x.ndim == 4 and len(x) == 1:
            x = x[0]
        if x.ndim != 3:
            raise ValueError(f"interpolate takes single images (C, H, W), got {tuple(x.shape)}")
        ends.append(to_float(x))
    y = None if y_a is None and y_b is None else torch.tensor([y_a, y_b], device=x_a.device)
    mu = model.encode(torch.stack(ends), y)[0]  # (2, D)
    t = torch.linspace(0, 1, steps, device=x_a.device).unsqueeze(1)  # (steps, 1)
    z = (1 - t) * mu[0] + t * mu[1]  # (steps, D)
    if y is None:
        return model.decode(z)
    onehot = F.one_hot(y, model.num_classes).float()  # (2, K)
    return model.decode(z, (1 - t) * onehot[0] + t * onehot[1])  # (steps, K) label mixtures


# ---------------------------------------------------------------------------------------------
# Saving and loading
#
## A saved model describes itself, as nanoGPT's checkpoints keep model_args: the file holds the
## class's name and constructor arguments beside the weights, so `load_model` rebuilds it from
## the file alone. torch.load(weights_only=True) reads tensors and plain values only: a pickle
## that carries Python objects could run code when loaded, so it is refused. The likelihood and
## sigma a model was trained with are not part of it: keep them beside it, in `extra`.


def save_model(model, file, **extra):
    """Save model (a VAE of this file, or a subclass) to `file` (a path or a binary file object),
    in torch.save's order, as a plain dict: model_class, model_args, model (the weights), and the
    plain values of `extra` (an optimizer's state_dict, say). A model compiled by torch.compile or
    wrapped in DistributedDataParallel is saved as the model inside, whose names its keys have."""
    for _ in range(2):  # torch.compile's wrapper and DistributedDataParallel's, in either order
        model = getattr(model, "_orig_mod", getattr(model, "module", model))
    state = dict(model_class=type(model).__name__, model_args=model.model_args)
    torch.save(dict(state, model=model.state_dict(), **extra), file)


def model_from_dict(state, name="the file", cls=None):
    """The model described by the dict of a `save_model` file (as torch.load returns it), on the
    device its weights were loaded to, in eval mode: a `cls(**model_args)`, cls by default the
    ConvVAE or MLPVAE the file names. ValueError names the file (`name`) when the dict is not one
    of `save_model` (a plain state_dict, say) or names a class of your own and no cls is given;
    TypeError when model_args do not fit cls, torch's RuntimeError when the weights do not."""
    if not isinstance(state, dict) or "model_class" not in state:
        raise ValueError(
            f"{name} was not written by save_model; for a plain state_dict, build the model and "
            f"call model.load_state_dict(torch.load(...))"
        )
    cls = cls or {c.__name__: c for c in (ConvVAE, MLPVAE)}.get(state["model_class"])
    if cls is None:
        raise ValueError(
            f"{name} holds a {state['model_class']}, a class of your own: give it to load_model, "
            f"load_model(file, cls={state['model_class']})"
        )
    model = cls(**state["model_args"])
    model.load_state_dict(state["model"])  # torch's RuntimeError names the weights that do not fit
    return model.to(next(iter(state["model"].values())).device).eval()


def load_model(file, map_location="cpu", cls=None):
    """The model saved by `save_model` in `file`, on map_location (a device), in eval mode, as
    evaluation and sampling want it (`train_step` puts it back in train mode); cls: your own
    subclass, which `save_model` named. torch.load(weights_only=True) refuses a file that carries
    Python objects, which could run code when loaded. ValueError as `model_from_dict`; torch.load's
    errors (no file, not a PyTorch file, a pickle with code) pass through."""
    state = torch.load(file, map_location=map_location, weights_only=True)
    return model_from_dict(state, f"'{file}'", cls)


# =============================================================================================
# Part 2: the tool. Data, devices and torchrun, the run folder, figures, the final report, the
# run and its command line: `train` is a run from the data to the report, `main` reads the flags.
# =============================================================================================

import argparse
import csv
import json
import os
import re
import sys
import time

import torch.distributed as dist


def fail(message):
    """Stop with one sentence and exit code 1: a mistake of the user's, not a bug."""
    raise SystemExit(f"vae.py: error: {message}")


# ---------------------------------------------------------------------------------------------
# Data: each split read once into one uint8 tensor (N, C, S, S), the form Part 1 takes

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
DATASETS.update({"cifar10": "CIFAR10", "folder": None})  # folder: your images


def load_torchvision(name, data_dir, image_size=None, channels=None):
    """A torchvision dataset, downloaded if data_dir lacks it: a dict of train_x, test_x (N, C, S, S)
    uint8 (S = image_size and C = channels; None: the data's), train_y, test_y (N,) and classes."""
    from torchvision import datasets
    from torchvision.transforms.functional import resize, rgb_to_grayscale

    cls = getattr(datasets, DATASETS[name])
    try:
        splits = [cls(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:  # offline, or a damaged file: torchvision raises many kinds
        folder = data_dir if name == "cifar10" else os.path.join(data_dir, cls.__name__, "raw")
        files = [cls.filename] if name == "cifar10" else [f for f, _ in cls.resources]
        reason = (str(e).strip() or type(e).__name__).splitlines()[-1]  # torchvision's last word
        fail(
            f"{cls.__name__} could not be read from '{folder}' nor downloaded ({reason}); "
            f"put its files there: {', '.join(files)} (each .gz may be uncompressed)."
        )
    data = dict(classes=list(splits[0].classes))
    for split, ds in zip(("train", "test"), splits):
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W[, C]) -> NCHW
        chunks = []
        for chunk in x.split(4096):  # in chunks: torchvision converts in floats
            if channels == 1 and chunk.shape[1] == 3:
                chunk = rgb_to_grayscale(chunk)  # PIL's weights (ITU-R 601-2)
            if image_size and image_size != chunk.shape[-1]:
                chunk = resize(chunk, [image_size, image_size], antialias=True)
            chunks.append(chunk.expand(-1, channels or chunk.shape[1], -1, -1))  # grey into RGB
        data[f"{split}_x"] = torch.cat(chunks)
        data[f"{split}_y"] = torch.as_tensor(ds.targets)
    return data


def image_folder(root):
    """(paths, labels, classes) of root: a class per subfolder, as torchvision's ImageFolder reads
    them; without subfolders, root's own images, sorted, with labels and classes None."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not any(entry.is_dir() for entry in os.scandir(root)):
        names = sorted(name for name in os.listdir(root) if name.lower().endswith(IMG_EXTENSIONS))
        return [os.path.join(root, name) for name in names], None, None
    try:
        folder = ImageFolder(root)
    except FileNotFoundError as e:  # a class folder without images
        fail(f"'{root}': {e}")
    return [path for path, _ in folder.samples], folder.targets, folder.classes


def load_image(path, size, channels):
    """An image file as (channels, size, size) uint8: resized (antialiased) so that its shorter side
    is `size`, then its centre square."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    with Image.open(path) as image:
        if image.mode.startswith(("I", "F")):  # 16 or 32 bits a pixel, which convert() would clip
            fail(f"'{path}' has pixels of more than 8 bits (mode {image.mode}); convert it to 8.")
        image = image.convert("RGB" if channels == 3 else "L")  # from any 8-bit mode
    return pil_to_tensor(center_crop(resize(image, size), size))


def load_folder(data_dir, image_size, channels):
    """A folder of images as `load_torchvision`'s dict: its train/ and val/ (or test/) are the splits,
    the test classes numbered as train/'s, by name; else a fixed random 10% is the test split."""
    from tqdm import tqdm

    if not os.path.isdir(data_dir):
        fail(f"--data_dir '{data_dir}' is not a folder; --dataset folder reads a folder of images.")
    test = next((d for d in ("val", "test") if os.path.isdir(os.path.join(data_dir, d))), None)
    if test and os.path.isdir(os.path.join(data_dir, "train")):
        train_paths, train_y, classes = image_folder(os.path.join(data_dir, "train"))
        test_paths, test_y, test_classes = image_folder(os.path.join(data_dir, test))
        if test_y is not None:
            if set(test_classes) - set(classes or ()):
                fail(f"'{test}' has classes that 'train' has not: {test_classes}, {classes}.")
            test_y = [classes.index(test_classes[c]) for c in test_y]
    else:
        paths, labels, classes = image_folder(data_dir)
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
        n_test = round(0.1 * len(paths))
        train_paths = [paths[i] for i in order[n_test:]]
        test_paths = [paths[i] for i in order[:n_test]]
        train_y = None if labels is None else [labels[i] for i in order[n_test:]]
        test_y = None if labels is None else [labels[i] for i in order[:n_test]]
    data = dict(classes=classes)
    for split, paths, labels in (("train", train_paths, train_y), ("test", test_paths, test_y)):
        if not paths:
            fail(f"'{data_dir}' has no images for a {split} split.")
        images = [load_image(p, image_size, channels) for p in tqdm(paths, split, disable=None)]
        data[f"{split}_x"] = torch.stack(images)
        data[f"{split}_y"] = None if labels is None else torch.tensor(labels)
    return data


def load_data(config, device):
    """The run's data on the device: `load_torchvision`'s dict, the test set binarized once with
    --binarize, the labels there only for --conditional (else None; on the CPU in `labels`)."""
    size = config.image_size
    channels = config.channels
    if config.dataset == "folder":
        data = load_folder(config.data_dir, size or 64, channels or 3)
    else:
        data = load_torchvision(config.dataset, config.data_dir, size, channels)
    if config.binarize:  # once, seeded on the CPU: the same test set on every device
        g = torch.Generator().manual_seed(0)
        data["test_x"] = torch.bernoulli(to_float(data["test_x"]), generator=g).byte() * 255
    if config.conditional and data["classes"] is None:
        fail("--conditional needs class labels, and these images have no class subfolders.")
    data["labels"] = data["test_y"]
    for split in ("train", "test"):
        data[f"{split}_x"] = data[f"{split}_x"].to(device)
        data[f"{split}_y"] = data[f"{split}_y"].to(device) if config.conditional else None
    return data


# ---------------------------------------------------------------------------------------------
# Devices, and several processes under torchrun
#
## Data parallel training: torchrun starts a process per GPU (or several on the CPU), each with the
## same weights and a share of each batch, and each gradient is averaged over the processes before
## the step, so that all take the same one. DistributedDataParallel's wrapper averages only what
## runs inside its forward, and the IWAE bound calls encode and decode_logits: so a hook on each
## parameter averages its gradient, as soon as backward has it, whatever computed it.


def select_device(name, deterministic=False):
    """--device: 'auto' is cuda, then mps, then cpu; deterministic: repeatable CUDA runs."""
    have = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    name = next(d for d in ("cuda", "mps", "cpu") if have[d]) if name == "auto" else name
    if not have[name]:
        fail(f"--device {name} is not available here; use --device auto or cpu.")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True)
    if name == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # fixed shapes: cuDNN's fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on the tensor cores
    return torch.device(name)


def join_processes(device):
    """(rank, world size, device) of this process: under torchrun (RANK is set), in the process
    group, nccl with a GPU each on cuda, gloo on the CPU; else (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def average_gradients(model, world):
    """Average each parameter's gradient over the `world` processes, as backward computes it."""

    def average(p):
        dist.all_reduce(p.grad)  # the sum (gloo has no mean)
        p.grad /= world

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(average)


# ---------------------------------------------------------------------------------------------
# The run folder and checkpoints

RUN_FILES = re.compile(  # the files a run writes, which --overwrite removes
    r"(checkpoint\.pt|config\.json|metrics\.csv|evaluation\.json|(reconstructions(_epoch\d+)?|"
    r"samples(_per_class)?|interpolation|loss_curves|latent_distribution|traversals|"
    r"class_means|best_worst|latent_pca)\.png)(\.tmp)?"
)


def run_files(folder):
    """The names of a run's files in `folder`, sorted ([] if there is no such folder)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(name for name in names if RUN_FILES.fullmatch(name))


def make_out_dir(out_dir, overwrite):
    """Make out_dir; with `overwrite`, first remove the earlier run's files there and in its eval/."""
    for folder in (out_dir, os.path.join(out_dir, "eval")) if overwrite else ():
        for name in run_files(folder):
            os.remove(os.path.join(folder, name))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot make --out_dir '{out_dir}' ({e.strerror}); choose another.")


def save_checkpoint(path, model, **state):
    """Part 1's `save_model` with a run's state, written to a temporary file that then replaces
    `path`: a failure at any moment leaves the previous checkpoint whole."""
    save_model(model, path + ".tmp", **state)
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """The dict of a run's checkpoint, on the CPU; one sentence for a file that is missing, not a
    checkpoint, or a pickle that carries code (which weights_only refuses)."""
    if not os.path.isfile(path):
        fail(f"there is no checkpoint at '{path}'.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model_from_dict(state, f"'{path}'")  # a model of vae.py, whose weights fit
    except Exception as e:  # torch's reader fails in many ways on a file that is not a checkpoint
        fail(f"'{path}' is not a checkpoint of vae.py ({str(e).strip().splitlines()[0]}).")
    if "config" not in state:
        fail(f"'{path}' holds a model of save_model, not a run: load it with load_model.")
    return state


# ---------------------------------------------------------------------------------------------
# Figures: each a short function on `save_grid` (images) or `figure` (plots). matplotlib's object
# API, without pyplot, leaves a caller's backend alone.


def figure(width, height):
    from matplotlib.figure import Figure  # imported here: only the figures need matplotlib

    return Figure(figsize=(width, height), layout="constrained")


def save_grid(rows, path, title, row_labels=(), col_labels=()):
    """Rows of images (R, n, C, H, W) in [0, 1] as one titled grid, two screen pixels per image
    pixel, with a label per row and per column if given."""
    from torchvision.utils import make_grid

    r, n = rows.shape[:2]
    grid = make_grid(rows.flatten(0, 1).float().cpu(), nrow=n, padding=2, pad_value=1.0)
    h, w = grid.shape[1:]  # grid: (3, h, w)
    ax = figure(1.5 + w / 50, 0.6 + h / 50).subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([2 + (h - 2) / r * (i + 0.5) for i in range(len(row_labels))], row_labels)
    ax.set_xticks([2 + (w - 2) / n * (i + 0.5) for i in range(len(col_labels))], col_labels)
    ax.tick_params(length=0)
    ax.set_title(title)
    ax.figure.savefig(path, dpi=100)


def save_reconstructions(model, data, path, title):
    """The first 16 test images above their reconstructions from the posterior mean."""
    x = to_float(data["test_x"][:16])
    y = None if data["test_y"] is None else data["test_y"][:16]
    save_grid(torch.stack([x, reconstruct(model, x, y)]), path, title, ["image", "decode(mu)"])


def save_samples(model, path, classes, seed):
    """8 x 8 images decoded from z ~ N(0, I); for a conditional model, a row per class decoding the
    same 10 z, so that a column keeps one style."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    if not model.num_classes:
        images = model.sample(64, generator=g)
        title = "samples: z ~ N(0, I), decoded to the mean of p(x|z)"
        return save_grid(images.view(8, 8, *images.shape[1:]), path, title)
    z = torch.randn(10, model.latent_dim, device=device, generator=g)
    y = torch.arange(model.num_classes, device=device).repeat_interleave(10)
    images = model.decode(z.repeat(model.num_classes, 1), y)
    title = "conditional samples: row = label y, column = one z ~ N(0, I)"
    save_grid(images.view(-1, 10, *images.shape[1:]), path, title, classes)


def save_interpolation(model, data, pair, path):
    """decode(z) on the line between the mu of the first test images of the classes `pair`
    (indices; test images 0 and 1 when they are one class or the test set lacks one), between the
    two images."""
    labels = [] if data["labels"] is None else data["labels"].tolist()
    i = 0
    j = 1
    what = "test images 0 and 1"
    if pair[0] != pair[1] and set(pair) <= set(labels):
        i = labels.index(pair[0])
        j = labels.index(pair[1])
        what = f"test images of {data['classes'][pair[0]]} and {data['classes'][pair[1]]}"
    ends = to_float(data["test_x"][[i, j]])
    y = (labels[i], labels[j]) if model.num_classes else (None, None)
    line = interpolate(model, ends[0], ends[1], 10, *y)
    title = f"interpolation: decode(z) between the mu of {what}"
    save_grid(torch.cat([ends[:1], line, ends[1:]])[None], path, title)


def plot_losses(history, path):
    """The -ELBO, recon and KL per epoch, train (each epoch's means) and test, in nats per image,
    from the metrics' rows; the title says what the run minimised."""
    betas = sorted({row["beta"] for row in history})
    beta = f"{betas[0]:g}" if len(betas) == 1 else f"{betas[0]:g} to {betas[-1]:g}"
    o = [row["objective"] for row in history]
    starts = [(row["epoch"], o[i]) for i, row in enumerate(history) if i == 0 or o[i] != o[i - 1]]
    words = ["recon + beta KL" if obj == "elbo" else f"-{obj.upper()}" for _, obj in starts]
    minimised = ", then ".join(f"{w} from epoch {e}" for (e, _), w in zip(starts, words))
    panels = {"neg_elbo": f"-ELBO = recon + KL\n(minimised: {minimised}; beta {beta})"}
    panels.update(recon="reconstruction -log p(x|z)", kl="KL(q(z|x) || p(z))")
    fig = figure(12, 3.8)
    epochs = [row["epoch"] for row in history]
    for ax, (key, title) in zip(fig.subplots(1, 3), panels.items()):
        keys = ("train_recon", "train_kl") if key == "neg_elbo" else (f"train_{key}",)
        ax.plot(epochs, [sum(row[k] for k in keys) for row in history], "o-", ms=3, label="train")
        ax.plot(epochs, [row[f"test_{key}"] for row in history], "s-", ms=3, label="test")
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs 1, 2, not 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def save_latent_distribution(mu, logvar, stats, path, seed):
    """The aggregate posterior q(z) against the prior, the posteriors' sigmas, and each dimension's
    KL, the active units in blue; mu, logvar: (N, D) on the CPU, stats: `evaluate`'s.

    q(z), the mean over images x of q(z|x), is what should match the prior N(0, I); drawn as
    z = mu + sigma * eps, one per image, its variance is Var(mu) + E[sigma^2]."""
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed))
    ax_z, ax_sigma, ax_kl = figure(15, 3.8).subplots(1, 3)
    label = f"z ~ q(z), variance {z.var(correction=0):.2f}"
    ax_z.hist(z.flatten(), 100, density=True, alpha=0.6, label=label)
    ax_z.hist(mu.flatten(), 100, density=True, histtype="step", label="mu, the posterior means")
    t = torch.linspace(-4, 4, 200)
    ax_z.plot(t, torch.exp(-0.5 * t**2) / math.sqrt(2 * math.pi), "k", label="prior N(0, 1)")
    ax_z.set(title="aggregate posterior q(z), all dimensions", xlabel="z", ylabel="density")
    ax_z.legend(fontsize=8)
    ax_sigma.hist(sigma.flatten(), 100, alpha=0.7)
    ax_sigma.axvline(1.0, color="k", label="prior sigma = 1")
    ax_sigma.set(title="posterior standard deviations sigma", xlabel="sigma", ylabel="count")
    ax_sigma.legend()
    kl = torch.tensor(stats["kl_per_dim"])
    order = torch.argsort(kl, descending=True).tolist()
    active = [stats["mu_var"][d] > ACTIVE_UNIT_THRESHOLD for d in order]
    ax_kl.bar(range(len(kl)), kl[order].tolist(), color=["C0" if a else "C7" for a in active])
    shown = range(0, len(kl), -(-len(kl) // 32))  # at most 32 labels
    ax_kl.set_xticks(shown, [str(order[i]) for i in shown], fontsize=6)
    title = f"KL per dimension: {sum(active)} of {len(kl)} active (blue)"
    ax_kl.set(title=title, xlabel="latent dimension", ylabel="nats per image")
    ax_z.figure.savefig(path, dpi=100)


def save_traversals(model, x, y, mu_var, path, n_dims=8):
    """mu(x) of one image x (C, H, W) (label y if conditional) decoded with one dimension swept over
    [-3, 3], for the n_dims dimensions whose mu varies most across the test set (the active-unit
    measure: a dimension's KL can be spent on nothing about x)."""
    y = None if y is None else y[None]
    mu = model.encode(x[None], y)[0][0]  # (D,)
    dims = torch.argsort(torch.tensor(mu_var), descending=True)[:n_dims].tolist()
    values = torch.linspace(-3, 3, 11, device=mu.device)
    z = mu.repeat(len(dims), 11, 1)  # (n_dims, 11, D)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    images = model.decode(z.flatten(0, 1), None if y is None else y.expand(len(dims) * 11))
    title = "traversals of the dimensions of largest Var(mu) (in brackets), from one test image"
    rows = [f"z{d} ({mu_var[d]:.2f})" for d in dims]
    columns = [f"{round(v, 1) + 0.0:+.1f}" for v in values.tolist()]  # + 0.0: no -0.0
    save_grid(images.view(len(dims), 11, *x.shape), path, title, rows, columns)


def save_class_means(model, mu, labels, classes, path, seed, noise=0.1):
    """For each class, the mean of its test images' mu (N, D) plus noise * N(0, I), 8 times, decoded
    (with the class's label, for a conditional model); labels (N,) on the CPU."""
    present = sorted(set(labels.tolist()))
    means = torch.stack([mu[labels == c].mean(0) for c in present])  # (classes, D)
    eps = torch.randn(len(present), 8, mu.shape[1], generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    y = torch.tensor(present, device=device).repeat_interleave(8) if model.num_classes else None
    images = model.decode((means[:, None] + noise * eps).flatten(0, 1).to(device), y)
    title = f"class means of mu + {noise} * N(0, I), decoded"
    title += " with the label" if model.num_classes else ""
    rows = [str(classes[c]) for c in present]
    save_grid(images.view(len(present), 8, *images.shape[1:]), path, title, rows)


def save_latent_pca(mu, labels, classes, path):
    """The means mu (N, D) on their first two principal components, coloured by class (labels (N,)
    on the CPU; None: one colour)."""
    centered = mu - mu.mean(0)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    points = centered @ v[:2].T  # (N, 2)
    explained = s**2 / (s**2).sum()
    ax = figure(6.5, 5.5).subplots()
    for c in [None] if labels is None else sorted(set(labels.tolist())):
        mine = points if c is None else points[labels == c]
        ax.scatter(*mine.T, s=2, alpha=0.5, color=f"C{(c or 0) % 10}", label=classes and classes[c])
    if labels is not None:
        ax.legend(markerscale=6, title="class", fontsize=8)
    ax.set(title="test-set means mu, first two principal components")
    ax.set(xlabel=f"PC 1 ({explained[0]:.0%} of variance)", ylabel=f"PC 2 ({explained[1]:.0%})")
    ax.figure.savefig(path, dpi=100)


def save_best_worst(data, error, x_hat, path, n=16):
    """The n test images reconstructed best and worst (error (N,), in nats), above x_hat (N, C, H, W)
    uint8, their reconstructions."""
    order = torch.argsort(error)
    best = order[:n]
    worst = order.flip(0)[:n]
    x = data["test_x"].cpu()
    grid = torch.stack([x[best], x_hat[best], x[worst], x_hat[worst]]).float() / 255
    title = f"best and worst reconstructed test images ({error[best[0]]:.4g} to "
    title += f"{error[worst[0]]:.4g} nats)"
    save_grid(grid, path, title, ["best", "recon", "worst", "recon"])


# ---------------------------------------------------------------------------------------------
# The final report: the numbers of a trained model, and every figure


@in_eval_mode
def reconstruction_errors(model, data, likelihood, sigma):
    """Each test image's -log p(x | z = mu) in nats (N,), its mu and logvar (N, D) and its
    reconstruction, uint8 (N, C, H, W): all on the CPU."""
    out = []
    for start in range(0, len(data["test_x"]), 1000):
        x = to_float(data["test_x"][start : start + 1000])
        y = None if data["test_y"] is None else data["test_y"][start : start + 1000]
        mu, logvar = model.encode(x, y)
        logits = model.decode_logits(mu, y)
        error = reconstruction_loss(logits, x, likelihood, sigma)
        out.append(
            [t.cpu() for t in (error, mu, logvar, (torch.sigmoid(logits) * 255).round().byte())]
        )
    return [torch.cat(parts) for parts in zip(*out)]


def evaluate_nll(model, images, labels, k, likelihood, sigma, seed):
    """-log p(x) by `log_likelihood` with k samples (of x given y, for a conditional model), in
    nats per image, the mean over images (N, C, H, W) on the model's device."""
    generator = torch.Generator(images.device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(images), 100):
        y = None if labels is None else labels[start : start + 100]
        x = images[start : start + 100]
        total += log_likelihood(model, x, k, y, likelihood, sigma, generator).sum().item()
    return -total / len(images)


@in_eval_mode
def report(model, data, history, config):
    """The final evaluation, printed and in evaluation.json (nats per image), and every figure,
    in config.out_dir. Bits per dimension only for binary pixels: a Bernoulli of grey pixels
    is not a probability, a Gaussian a density."""
    path = lambda name: os.path.join(config.out_dir, name)  # noqa: E731
    likelihood = config.likelihood
    sigma = config.sigma
    seed = config.seed
    epoch = history[-1]["epoch"]
    beta = history[-1]["beta"]
    generator = torch.Generator(data["test_x"].device).manual_seed(seed)
    te = evaluate(model, data["test_x"], data["test_y"], likelihood, sigma, generator)
    # the loss as the last epoch minimised it: each KL_j (the test set's mean) with its floor, or
    # minus the IWAE bound of its K
    iwae = config.iwae_samples
    loss = te["recon"] + beta * sum(max(config.free_bits, kl) for kl in te["kl_per_dim"])
    if iwae > 1:
        loss = evaluate_nll(model, data["test_x"], data["test_y"], iwae, likelihood, sigma, seed)
    results = dict(epoch=epoch, likelihood=likelihood, sigma=sigma, beta=beta, test_loss=loss)
    results.update(test_neg_elbo=te["neg_elbo"], test_recon=te["recon"], test_kl=te["kl"])
    results.update({k: te[k] for k in ("active_units", "kl_per_dim", "mu_var")})
    binary = bool(((data["test_x"] == 0) | (data["test_x"] == 255)).all())
    note = ""
    if likelihood == "gaussian":
        note = f" (a Gaussian density with sigma {sigma:g}: it compares Gaussian runs of vae.py)"
    elif not binary:
        note = " (Bernoulli on pixels that are not binary: a cross-entropy that compares runs of "
        note += "vae.py, not a probability; --binarize gives the standard binary protocol)"
    print(
        f"test -ELBO {te['neg_elbo']:.3f} = recon {te['recon']:.3f} + kl {te['kl']:.3f} nats/image "
        f"(one z per image){note}; {te['active_units']} of {model.latent_dim} latent units active"
    )
    if beta != 1 or config.free_bits or iwae > 1:
        what = f"-IWAE{iwae}" if iwae > 1 else f"beta {beta:g}"
        print(f"test loss as the last epoch minimised it ({what}): {loss:.3f}")
    if config.nll_samples:
        k = config.nll_samples
        nll = evaluate_nll(model, data["test_x"], data["test_y"], k, likelihood, sigma, seed)
        results.update(nll_samples=k, test_nll=nll)
        bits = ""
        if likelihood == "bernoulli" and binary:
            results["test_nll_bits_per_dim"] = nll / (data["test_x"][0].numel() * math.log(2))
            bits = f", {results['test_nll_bits_per_dim']:.4f} bits/dim"
        what = "NLL" if data["test_y"] is None else "-log p(x|y)"
        print(f"test {what} (K={k}): {nll:.2f} nats/image{bits}{note}")
    error, mu, logvar, x_hat = reconstruction_errors(model, data, likelihood, sigma)
    labels = data["labels"]
    classes = data["classes"]
    if labels is not None:  # each class's mean reconstruction error -log p(x | z = mu)
        present = sorted(set(labels.tolist()))
        results["recon_error_per_class"] = {
            classes[c]: error[labels == c].mean().item() for c in present
        }
    with open(path("evaluation.json"), "w") as f:
        json.dump(results, f, indent=2)
    title = f"epoch {epoch}: test images and their reconstructions"
    save_reconstructions(model, data, path(f"reconstructions_epoch{epoch:03d}.png"), title)
    plot_losses(history, path("loss_curves.png"))
    samples = "samples_per_class.png" if model.num_classes else "samples.png"
    save_samples(model, path(samples), classes, seed)
    save_interpolation(model, data, config.interpolate, path("interpolation.png"))
    save_latent_distribution(mu, logvar, te, path("latent_distribution.png"), seed)
    y = None if data["test_y"] is None else data["test_y"][0]
    save_traversals(model, to_float(data["test_x"][0]), y, te["mu_var"], path("traversals.png"))
    save_best_worst(data, error, x_hat, path("best_worst.png"))
    if labels is not None:
        save_class_means(model, mu, labels, classes, path("class_means.png"), seed)
    save_latent_pca(mu, labels, classes, path("latent_pca.png"))
    return results


# ---------------------------------------------------------------------------------------------
# A run

# The flags --resume and --checkpoint may change, and their defaults for a new run: on the command
# line they default to None, which keeps the saved run's value.
RESUMABLE = dict(epochs=30, lr=2e-3, grad_clip=0.0, nll_samples=0, iwae_samples=1)
RESUMABLE.update(data_dir=None, device="auto", deterministic=False)


def settings(args):
    """(config, state): a new run's config is its flags (state None); --resume and --checkpoint
    take the saved run's and its checkpoint (state), with the flags of RESUMABLE given."""
    out_dir = args.out_dir or os.path.join("runs", args.model)
    given = {k: getattr(args, k) for k in RESUMABLE if getattr(args, k) is not None}
    config = vars(args) | RESUMABLE | given | dict(out_dir=out_dir)
    config["data_dir"] = config["data_dir"] or ("./mnist" if args.dataset == "mnist" else "./data")
    state = None
    if args.resume or args.checkpoint:
        state = load_checkpoint(args.checkpoint or os.path.join(out_dir, "checkpoint.pt"))
        config = state["config"] | given | dict(out_dir=out_dir, resume=args.resume)
        config.update(checkpoint=args.checkpoint, overwrite=args.overwrite)
    config = argparse.Namespace(**config)
    if args.checkpoint:  # the report of the saved epoch, in a folder of its own
        config.out_dir = args.out_dir or os.path.join(os.path.dirname(args.checkpoint), "eval")
        config.epochs = state["epoch"]
        if {"checkpoint.pt", "metrics.csv"} & set(run_files(config.out_dir)):
            fail(f"'{config.out_dir}' holds a run; give --checkpoint an --out_dir of its own.")
    elif args.resume and state["epoch"] >= config.epochs:
        fail(f"the run in '{out_dir}' is finished; give --epochs above {state['epoch']}.")
    if run_files(config.out_dir) and not (args.resume or args.overwrite):
        fail(f"'{config.out_dir}' holds a run: --resume it, --overwrite it, or choose another.")
    if config.iwae_samples > 1 and (config.beta != 1 or config.free_bits or config.kl_warmup):
        fail("the IWAE bound (--iwae_samples) has no --beta, --free_bits or --kl_warmup.")
    return config, state


def build_model(config, num_classes):
    """--model conv: a ConvVAE whose first block has --width channels; mlp: an MLPVAE with hidden
    layers of 16 and 8 times --width units (512 and 256 at 32)."""
    size = (config.image_size, config.channels, config.latent_dim)
    if config.model == "conv":
        return ConvVAE(*size, config.width, num_classes, config.res_blocks)
    return MLPVAE(*size, (16 * config.width, 8 * config.width), num_classes)


def build(config, state, data, device, rank, world):
    """(model, optimizer, scheduler, history): new, or the checkpoint's (state), from which a resumed
    run goes on bit for bit on the CPU: the same weights, Adam state and random state."""
    num_classes = len(data["classes"]) if config.conditional else 0
    model = build_model(config, num_classes) if state is None else model_from_dict(state)
    if model.num_classes != num_classes:
        fail(
            f"the model is conditional on {model.num_classes} classes, the data has {num_classes}."
        )
    model = model.to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions
    if world > 1:
        average_gradients(model, world)
    fused = device.type in ("cuda", "cpu")  # Adam's update of every tensor in one kernel
    optimizer = torch.optim.Adam(model.parameters(), config.lr, fused=fused)
    history = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        history = state["history"]
    if rank > 0:  # each process its own draws; rank 0 draws what a single process would
        torch.manual_seed(config.seed + rank + world * len(history))
    for group in optimizer.param_groups:  # a resumed run may be given another --lr
        group["lr"] = group["initial_lr"] = config.lr
    at = len(history) - 1  # a resumed run goes on at its epoch, on the curve of its --epochs
    if config.lr_schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1, at)
    else:
        scheduler = cosine_decay(optimizer, config.epochs, at)
    return model, optimizer, scheduler, history


def train_share(model, optimizer, data, config, epoch, rank, world):
    """Part 1's train_step over this process's share of an epoch, with a progress bar: the epoch's
    metrics row, its means over all processes. Under torchrun one order, seeded by the epoch, is
    padded so that each process takes as many steps, and dealt out by rank."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    beta = beta_schedule(epoch, config.beta, config.kl_warmup)
    images = data["train_x"]
    labels = data["train_y"]
    n = len(images)
    if world == 1:
        order = torch.randperm(n, device=images.device)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
        order = torch.cat([order, order[: -n % world]])[rank::world].to(images.device)
    keys = ("likelihood", "sigma", "free_bits", "grad_clip", "iwae_samples")
    step_args = {k: vars(config)[k] for k in keys}
    sums = torch.zeros(3, device=images.device)  # summed on the device: no wait at each step
    batch = config.batch_size // world
    for start in tqdm(range(0, len(order), batch), f"epoch {epoch}", leave=False, disable=None):
        idx = order[start : start + batch]  # (B,)
        x = get_batch(images, idx, config.binarize)  # (B, C, H, W) in [0, 1]
        y = None if labels is None else labels[idx]
        stats = train_step(model, optimizer, x, beta=beta, y=y, **step_args)
        sums += torch.stack([stats["loss"], stats["recon"], stats["kl"]]) * len(idx)
    if world > 1:  # every process took as many images
        dist.all_reduce(sums)
    loss, recon, kl = (sums / (len(order) * world)).tolist()  # waits for the device
    seconds = time.perf_counter() - t0
    objective = "elbo" if config.iwae_samples == 1 else f"iwae{config.iwae_samples}"
    row = dict(epoch=epoch, beta=beta, lr=optimizer.param_groups[0]["lr"], objective=objective)
    row.update(train_loss=loss, train_recon=recon, train_kl=kl, train_seconds=seconds)
    return row | dict(images_per_sec=n / seconds)


def kept(config, saved):
    """What a stopped run has kept, and how to go on, for the sentence that stops it."""
    if not saved:
        return "no epoch had finished, so no checkpoint was written"
    path = config.checkpoint or os.path.join(config.out_dir, "checkpoint.pt")
    more = saved < config.epochs and not config.checkpoint
    then = f"--resume --out_dir {config.out_dir}" if more else f"--checkpoint {path}"
    return f"the checkpoint of epoch {saved}, '{path}', is intact; go on with: python vae.py {then}"


def end_epoch(model, optimizer, data, history, config, row):
    """Rank 0's end of an epoch: the test -ELBO, the log line, metrics.csv, the checkpoint, and
    reconstructions at epochs 1, 5 and 15. A non-finite loss stops the run before any of them."""
    generator = torch.Generator(data["test_x"].device).manual_seed(config.seed)
    te = evaluate(model, data["test_x"], data["test_y"], config.likelihood, config.sigma, generator)
    if not math.isfinite(row["train_loss"] + te["neg_elbo"]):
        stop = f"the loss became non-finite in epoch {row['epoch']}; {kept(config, len(history))}"
        fail(f"{stop}; try a lower --lr or --grad_clip 10.")
    row.update(test_neg_elbo=te["neg_elbo"], test_recon=te["recon"], test_kl=te["kl"])
    history.append(row | dict(test_active_units=te["active_units"]))
    loss = "loss" if config.iwae_samples == 1 else f"-IWAE{config.iwae_samples}"
    print(
        f"epoch {row['epoch']:3d}/{config.epochs} | beta {row['beta']:.3f} | train {loss} "
        f"{row['train_loss']:8.3f} recon {row['train_recon']:8.3f} kl {row['train_kl']:7.3f} | "
        f"test -ELBO {te['neg_elbo']:8.3f} recon {te['recon']:8.3f} kl {te['kl']:7.3f} | AU "
        f"{te['active_units']:3d} | {row['train_seconds']:6.2f} s {row['images_per_sec']:7.0f} img/s",
        flush=True,
    )
    if te["kl"] < 0.1 or te["active_units"] == 0:  # posterior collapse (Bowman et al. 2016)
        print(
            f"warning: the posterior has collapsed: the test KL is {te['kl']:.3f} nats and "
            f"{te['active_units']} latent units are active, so the decoder learns little from z; "
            f"try --kl_warmup 10, --free_bits 0.5 or a smaller --beta."
        )
    path = lambda name: os.path.join(config.out_dir, name)  # noqa: E731
    epoch = row["epoch"]
    if epoch in (1, 5, 15):
        title = f"epoch {epoch}: test images and their reconstructions"
        save_reconstructions(model, data, path(f"reconstructions_epoch{epoch:03d}.png"), title)
    rng = dict(cpu=torch.get_rng_state(), cuda=[])
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = dict(optimizer=optimizer.state_dict(), config=vars(config), history=history)
    save_checkpoint(path("checkpoint.pt"), model, epoch=row["epoch"], rng=rng, **state)
    with open(path("metrics.csv"), "w", newline="") as f:  # after the checkpoint, which it follows
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def train(config, state=None):
    """A run, in the order it happens: the device and processes, the data, the model and Adam (new,
    or the checkpoint's); each epoch, train this process's share, then (rank 0) evaluate, log and
    save; then the final report. With --checkpoint, epochs is the saved epoch: only the report.
    Returns the metrics' rows."""
    rank, world, device = join_processes(select_device(config.device, config.deterministic))
    if config.batch_size % world:
        fail(f"--batch_size {config.batch_size} is shared by {world} processes: give a multiple.")
    torch.manual_seed(config.seed)  # the same initial weights in every process
    data = load_data(config, device)
    config.channels = data["train_x"].shape[1]
    config.image_size = data["train_x"].shape[-1]
    config.classes = data["classes"]
    model, optimizer, scheduler, history = build(config, state, data, device, rank, world)
    if rank == 0:
        make_out_dir(config.out_dir, config.overwrite)
        with open(os.path.join(config.out_dir, "config.json"), "w") as f:
            json.dump(vars(config), f, indent=2)
        print(
            f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"{len(data['train_x']):,} train and {len(data['test_x']):,} test images of "
            f"{tuple(data['train_x'].shape[1:])}; {device} x {world}; to {config.out_dir}",
            flush=True,
        )
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            row = train_share(model, optimizer, data, config, epoch, rank, world)
            if rank == 0:
                end_epoch(model, optimizer, data, history, config, row)
            scheduler.step()
        if world > 1:
            dist.destroy_process_group()
        if rank == 0:
            report(model, data, history, config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept(config, len(history))) from None
    return history


# ---------------------------------------------------------------------------------------------
# The command line
#
# Each flag's default is in its definition below, or for the flags of RESUMABLE in RESUMABLE;
# --help prints them. A bad value is one sentence from argparse (exit code 2) before anything is
# read or written. No abbreviations: --epoch for --epochs would be easy to misread.


def in_range(kind, low, high):
    """An argparse type: a number of `kind` (int or float) from low to high; its name, the range,
    is what a flag's help shows as %(type)s, and argparse's message for a word that is no number."""

    def parse(text):
        if not low <= kind(text) <= high:  # also for nan
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {text}")
        return kind(text)

    parse.__name__ = f"{low} to {high}"
    return parse


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action):  # a new run's default, where there is one
        default = RESUMABLE.get(action.dest, action.default)
        if default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: {default})"


def build_parser():
    """The command line: every flag with its range and default, in one place."""
    p = argparse.ArgumentParser(prog="vae.py", formatter_class=HelpFormatter, allow_abbrev=False)
    p.description = (
        "Train a VAE on MNIST, another dataset or your images and draw what it learned, "
    )
    p.description += (
        "or write the report of a saved run (--checkpoint); under torchrun in parallel."
    )
    add = p.add_argument_group("data").add_argument
    add("--dataset", choices=DATASETS, default="mnist", help="folder: your images")
    add("--data_dir", help="default ./mnist for mnist, ./data for the others")
    add("--image_size", type=int, choices=(28, 32, 64, 128), help="default: the data's")
    add("--channels", type=int, choices=(1, 3), help="default: the data's")
    add("--binarize", action="store_true", help="the binary likelihood protocol")
    add = p.add_argument_group("model and objective").add_argument
    add("--model", choices=("conv", "mlp"), default="conv", help="ConvVAE or MLPVAE")
    add("--latent_dim", type=in_range(int, 2, 4096), default=32, help="%(type)s")
    add("--width", type=in_range(int, 1, 1024), default=32, help="1st layer, %(type)s")
    add("--res_blocks", type=in_range(int, 0, 8), default=1, help="conv, %(type)s")
    add("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli", help="p(x|z)")
    add("--sigma", type=in_range(float, 0.001, 100.0), default=0.1, help="gaussian's, %(type)s")
    add("--beta", type=in_range(float, 0.0, 10000.0), default=1.0, help="KL weight, %(type)s")
    add("--kl_warmup", type=in_range(int, 0, 100000), default=0, help="epochs, %(type)s")
    add("--free_bits", type=in_range(float, 0.0, 100.0), default=0.0, help="nats, %(type)s")
    add("--iwae_samples", type=in_range(int, 1, 1000), help="K, 1: ELBO, %(type)s")
    add("--conditional", action="store_true", help="a conditional VAE (labels)")
    add = p.add_argument_group("training").add_argument
    add("--epochs", type=in_range(int, 1, 100000), help="%(type)s")
    add("--batch_size", type=in_range(int, 1, 65536), default=128, help="%(type)s")
    add("--lr", type=in_range(float, 1e-8, 10.0), help="%(type)s")
    add("--lr_schedule", choices=("constant", "cosine"), default="cosine", help="per epoch")
    add("--seed", type=in_range(int, 0, 2**32 - 1), default=0, help="%(type)s")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), help="auto: the best")
    add("--grad_clip", type=in_range(float, 0.0, 1e6), help="norm, %(type)s")
    add("--deterministic", action="store_true", default=None, help="repeatable CUDA runs, slower")
    add("--resume", action="store_true", help="continue the run in --out_dir")
    add("--overwrite", action="store_true", help="replace the run in --out_dir")
    add = p.add_argument_group("evaluation and outputs").add_argument
    add("--nll_samples", type=in_range(int, 0, 100000), help="K, %(type)s")
    add("--checkpoint", metavar="PATH", help="write the report of this run's checkpoint")
    add("--out_dir", help="default runs/<model>, or eval/ beside a --checkpoint")
    add("--interpolate", type=int, nargs=2, default=[4, 9], metavar=("A", "B"), help="classes")
    return p


def main(argv=None):
    """Run the command line (default sys.argv[1:]): train, or write the report of a saved run; returns
    the metrics' rows. A mistake stops it with one sentence: exit code 2 from argparse, else 1,
    and 130 for Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (args.overwrite or args.checkpoint):
        parser.error(
            "--resume continues the run in --out_dir: not with --overwrite or --checkpoint"
        )
    if args.dataset == "folder" and not (args.data_dir or args.resume or args.checkpoint):
        parser.error("--dataset folder needs --data_dir, the folder of images")
    config, state = settings(args)
    try:
        return train(config, state)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun the others would say it again
            print(
                f"vae.py: error: stopped by Ctrl-C; {e or 'nothing was written'}.", file=sys.stderr
            )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
