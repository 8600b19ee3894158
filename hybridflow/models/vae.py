"""Variational autoencoders for binary images whose approximate posterior is a flow.

The setting of the IAF and NAF papers' VAE experiments (Kingma et al. 2016, "Improved Variational
Inference with Inverse Autoregressive Flow", §5; Huang et al. 2018, "Neural Autoregressive
Flows", §5.2 and Table 1): a Bernoulli decoder ``p(x | z)``, a standard normal prior ``p(z)``, and
an encoder that outputs a diagonal Gaussian ``(μ, σ)`` and a context vector ``h``. The posterior
draws ``z₀ = μ + σ ⊙ ε`` and pushes it through IAF layers conditioned on ``h``:

* ``"diagonal"``: ``z = z₀`` (the plain VAE);
* ``"iaf"``: affine IAF layers (``z = z₀·exp(α(z₀; h)) + μ(z₀; h)`` per layer);
* ``"iaf-dsf"``, ``"iaf-ddsf"``: IAF-DSF / IAF-DDSF layers, the NAF paper's posteriors.

``log q(z | x) = log N(ε) − Σ log σ − log|det ∂z/∂z₀|`` comes with every draw
(:meth:`~hybridflow.transforms.InvertibleModule.inverse_and_logdet`), so the ELBO
``E_q[log p(x | z) + log p(z) − log q(z | x)]`` and the importance-sampled
``log p(x) ≈ log (1/S) Σ_s p(x, z_s)/q(z_s | x)`` (Burda et al. 2016) need no inverse.
Encoder and decoder are the same for every posterior, so rows of a comparison differ only there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..transforms import standard_normal_log_prob
from .variational import iaf_flow

__all__ = ["POSTERIORS", "FlowVAE"]

#: Posterior families of :class:`FlowVAE`.
POSTERIORS = ("diagonal", "iaf", "iaf-dsf", "iaf-ddsf")


class _Encoder(nn.Module):
    """``x → (μ, log σ, h)``: two stride-2 convolutions and a hidden layer (ELU)."""

    def __init__(self, shape: Sequence[int], latent: int, context: int, width: int) -> None:
        super().__init__()
        c, h, w = shape
        self.conv = nn.Sequential(
            nn.Conv2d(c, width, 5, stride=2, padding=2),
            nn.ELU(),
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2),
            nn.ELU(),
            nn.Flatten(),
        )
        flat = 2 * width * math.ceil(h / 4) * math.ceil(w / 4)
        self.hidden = nn.Sequential(nn.Linear(flat, 8 * width), nn.ELU())
        self.out = nn.Linear(8 * width, 2 * latent + context)
        self.latent, self.context = latent, context

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.out(self.hidden(self.conv(x)))
        mu, log_sigma, h = out.split([self.latent, self.latent, self.context], dim=1)
        return mu, log_sigma, h


class _Decoder(nn.Module):
    """``z → logits``: a hidden layer and two stride-2 transposed convolutions (ELU)."""

    def __init__(self, shape: Sequence[int], latent: int, width: int) -> None:
        super().__init__()
        c, h, w = shape
        self.grid = (2 * width, math.ceil(h / 4), math.ceil(w / 4))
        self.fc = nn.Sequential(
            nn.Linear(latent, 8 * width), nn.ELU(), nn.Linear(8 * width, math.prod(self.grid))
        )
        self.deconv = nn.Sequential(
            nn.ELU(),
            nn.ConvTranspose2d(2 * width, width, 5, stride=2, padding=2, output_padding=1),
            nn.ELU(),
            nn.ConvTranspose2d(width, c, 5, stride=2, padding=2, output_padding=1),
        )
        self.shape = (c, h, w)

    def forward(self, z: Tensor) -> Tensor:
        out = self.deconv(self.fc(z).reshape(-1, *self.grid))
        return out[:, :, : self.shape[1], : self.shape[2]]


class FlowVAE(nn.Module):
    """A VAE for binary images with a diagonal, IAF or IAF-DSF/DDSF posterior.

    Args:
        image_shape: ``(C, H, W)`` of one binary image.
        latent_dim: Dimension of ``z``.
        posterior: One of :data:`POSTERIORS`.
        num_flows: IAF layers of the flow posteriors.
        context_dim: Size of the encoder's context ``h`` read by every IAF layer.
        width: Channels of the first convolution (the rest scale with it).
        made_hidden: Hidden widths of each IAF layer's MADE.
        num_units, num_layers: DSF/DDSF units and DDSF layers.
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 32,
        posterior: str = "diagonal",
        num_flows: int = 2,
        context_dim: int = 64,
        width: int = 32,
        made_hidden: Sequence[int] = (320, 320),
        num_units: int = 16,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape, self.latent_dim, self.posterior = (
            tuple(image_shape),
            latent_dim,
            posterior,
        )
        context = 0 if posterior == "diagonal" else context_dim
        self.encoder = _Encoder(image_shape, latent_dim, context, width)
        self.decoder = _Decoder(image_shape, latent_dim, width)
        self.flow = None
        if posterior != "diagonal":
            transformer = {"iaf": "affine", "iaf-dsf": "dsf", "iaf-ddsf": "ddsf"}[posterior]
            self.flow = iaf_flow(
                latent_dim,
                num_flows,
                transformer,
                made_hidden,
                context_features=context_dim,
                num_units=num_units,
                num_layers=num_layers,
            ).transform

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected binary images [N, {', '.join(map(str, self.image_shape))}], "
                f"got {tuple(x.shape)}"
            )
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                "FlowVAE models binary images: every value must be 0 or 1 (binarize first, "
                "e.g. hybridflow.data.binarize)"
            )

    def posterior_sample(self, x: Tensor, samples: int = 1) -> tuple[Tensor, Tensor]:
        """``samples`` draws per image of ``z ~ q(z | x)`` and their ``log q``: ``[S, N, D]``
        and ``[S, N]``, differentiable (reparameterized)."""
        mu, log_sigma, h = self.encoder(x)
        n = x.shape[0]
        eps = torch.randn(samples, n, self.latent_dim, dtype=mu.dtype, device=mu.device)
        z = (mu + log_sigma.exp() * eps).reshape(samples * n, -1)
        log_q = standard_normal_log_prob(eps.reshape(samples * n, -1)) - log_sigma.sum(1).repeat(
            samples
        )
        if self.flow is not None:
            z, logdet = self.flow.inverse_and_logdet(z, h.repeat(samples, 1))
            log_q = log_q - logdet
        return z.reshape(samples, n, -1), log_q.reshape(samples, n)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x, z) = log p(x | z) + log p(z)`` for ``z`` of shape ``[S, N, D]``."""
        s, n = z.shape[:2]
        logits = self.decoder(z.reshape(s * n, -1))
        target = x.unsqueeze(0).expand(s, *x.shape).reshape(s * n, *x.shape[1:])
        log_px = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (log_px.flatten(1).sum(1) + standard_normal_log_prob(z.reshape(s * n, -1))).reshape(
            s, n
        )

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One draw per image: ``(log p(x | z), log q(z | x) − log p(z))``, the reconstruction
        and the single-sample KL estimate (their difference is the ELBO estimate)."""
        self._check(x)
        z, log_q = self.posterior_sample(x)
        logits = self.decoder(z[0])
        recon = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        return recon, log_q[0] - standard_normal_log_prob(z[0])

    def log_weights(self, x: Tensor, samples: int = 1) -> Tensor:
        """``log p(x, z_s) − log q(z_s | x)`` for ``samples`` draws per image: ``[S, N]``."""
        self._check(x)
        z, log_q = self.posterior_sample(x, samples)
        return self.log_joint(x, z) - log_q

    def elbo(self, x: Tensor, samples: int = 1) -> Tensor:
        """Per-image ELBO (nats), averaged over ``samples`` draws."""
        return self.log_weights(x, samples).mean(0)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, samples: int = 1000, chunk: int = 100) -> Tensor:
        """Per-image importance-sampled ``log p(x)`` with ``samples`` draws (nats), a stochastic
        lower bound that tightens as ``samples`` grows (Burda et al. 2016)."""
        parts = [self.log_weights(x, min(chunk, samples - s)) for s in range(0, samples, chunk)]
        return torch.logsumexp(torch.cat(parts, dim=0), dim=0) - math.log(samples)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images: Bernoulli means ``σ(decoder(z))`` with ``z ~ N(0, I)``."""
        param = next(self.parameters())
        z = torch.randn(
            n, self.latent_dim, generator=generator, dtype=param.dtype, device=param.device
        )
        return torch.sigmoid(self.decoder(z))
