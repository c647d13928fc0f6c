"""What the three models share: the decoder, Gaussian helpers, the gradient-origin step and the frame loop.

A model is a per-frame filter: prior -> posterior -> decode -> advance. Training sums the ELBO over frames (thesis
algorithm 3); `predict` runs the same loop in eval mode (posterior means, no sampling) for the thesis' three
evaluations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gopc import stabilizers
from gopc.config import Config


# Gaussians. Heads emit (mu, raw); stabilizers.variance turns raw into a log-variance by the configured law.

def sample(mu, lv, stochastic: bool):
    return mu + torch.exp(0.5 * lv) * torch.randn_like(mu) if stochastic else mu


def kl_normal(mu_q, lv_q, mu_p, lv_p) -> torch.Tensor:
    """KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p)) per dimension."""
    return 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q - mu_p) ** 2) * torch.exp(-lv_p) - 1.0)


def kl_std_normal(mu, lv) -> torch.Tensor:
    """KL(N(mu, e^lv) || N(0, I)) per dimension."""
    return 0.5 * (torch.exp(lv) + mu ** 2 - 1.0 - lv)


def recon_per_pixel(logits, x, kind: str) -> torch.Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return (torch.sigmoid(logits) - x) ** 2


# Networks.

class Decoder(nn.Module):
    """DCGAN-style transposed convs to frame logits; ELU, no batch norm: it would couple the inner step's samples."""

    def __init__(self, r_dim: int, ngf: int, frame_size: int):
        super().__init__()
        n_up = int(math.log2(frame_size // 4))
        ch = [ngf * 2 ** i for i in reversed(range(n_up))] + [1]  # 64 px: 8ngf, 4ngf, 2ngf, ngf, 1
        layers: list[nn.Module] = [nn.ConvTranspose2d(r_dim, ch[0], 4, 1, 0), nn.ELU()]
        for i in range(n_up):
            layers.append(nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1))
            if i < n_up - 1:
                layers.append(nn.ELU())
        self.net = nn.Sequential(*layers)

    def forward(self, r):
        return self.net(r[:, :, None, None])


class Encoder(nn.Module):
    """VAE-1's frame encoder: the decoder's mirror image, then (mu, raw log-variance)."""

    def __init__(self, r_dim: int, ngf: int, frame_size: int):
        super().__init__()
        n_down = int(math.log2(frame_size // 4))
        ch = [1] + [ngf * 2 ** i for i in range(n_down)]
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1), nn.ELU()]
        layers += [nn.Conv2d(ch[-1], 2 * ch[-1], 4, 1, 0), nn.ELU(), nn.Flatten(), nn.Linear(2 * ch[-1], 2 * r_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)


class GaussianHead(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.mu, self.raw = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)

    def forward(self, h):
        return self.mu(h), self.raw(h)


class LSTMPrior(nn.Module):
    """GOPC-1 / VAE-1 transition p(r_t | r_{<t}): three stacked LSTM cells, then a Gaussian head."""

    def __init__(self, r_dim: int, hidden: int):
        super().__init__()
        self.cells = nn.ModuleList([nn.LSTMCell(r_dim if i == 0 else hidden, hidden) for i in range(3)])
        self.head = GaussianHead(hidden, r_dim)

    def forward(self, r_prev, state):
        state = state or [None] * len(self.cells)
        h, new = r_prev, []
        for cell, s in zip(self.cells, state):
            h, c = cell(h, s)
            new.append((h, c))
        return *self.head(h), new


# The gradient-origin step and the frame loop.

class SeqModel(nn.Module):
    """Base of GOPC-1, VAE-1 and GOPC-2. Subclasses define `init_carry`, `prior`, `posterior`, `advance`.

    While a forward pass runs, every inner gradient's norm is appended to `self.watch` as (site, frame, float64 norm):
    float64, so the norm is finite exactly when every entry is, and the divergence guard can test them all with one
    device sync. `self.poison` (site -> value) is the test hook that forces a value into the first inner gradient of
    that site."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.s = cfg, cfg.stab
        self.decoder = Decoder(cfg.model.r_dim, cfg.model.ngf, cfg.data.frame_size)
        self.watch: list[tuple[str, int, torch.Tensor]] = []
        self.poison: dict[str, float] = {}

    # subclass interface --------------------------------------------------------------------------
    def init_carry(self, x) -> dict:
        """What a model carries from frame to frame; `zeros` is N(0, I)'s parameters for r_1."""
        return {"zeros": x.new_zeros(x.shape[0], self.cfg.model.r_dim), "r": None}

    def prior(self, carry, t):  # -> mu_p, lv_p (log-variance), carry
        raise NotImplementedError

    def posterior(self, x_t, mu_p, lv_p, t):  # -> mu, lv
        raise NotImplementedError

    def advance(self, carry, r, t, infer=True):  # -> carry, after r_t is known
        raise NotImplementedError

    def extra_loss(self, carry, beta):  # terms outside the per-frame ELBO
        return None

    # shared machinery ----------------------------------------------------------------------------
    def gradient_step(self, site, t, inner_loss, origin, lr, second_order):
        """One step from `origin` down `inner_loss`, the GON 'encoder'; second_order keeps it in the graph (HVPs)."""
        create = second_order and torch.is_grad_enabled() and self.training
        # retain_graph: the inner graph shares nodes with the outer loss, which must stay usable.
        (g,) = torch.autograd.grad(inner_loss, origin, create_graph=create, retain_graph=True)
        if site in self.poison:
            g = g + self.poison.pop(site)
        self.watch.append((site, t, torch.linalg.vector_norm(g.detach().double())))
        return g

    def gon_posterior(self, head, x_t, mu_p, lv_p, t):
        """Thesis algorithm 2: z0 = 0, decode a first guess, one step down the full inner ELBO."""
        with torch.enable_grad():
            z0 = torch.zeros(x_t.shape[0], self.cfg.model.r_dim, device=x_t.device, dtype=x_t.dtype, requires_grad=True)
            mu0, raw0 = head(z0)
            lv0 = stabilizers.variance(raw0, self.s.variance)
            logits0 = self.decoder(sample(mu0, lv0, self.training))
            red = self.s.inner_reduction
            inner = stabilizers.inner_reduction(recon_per_pixel(logits0, x_t, self.cfg.model.recon), red) \
                + stabilizers.inner_reduction(kl_normal(mu0, lv0, mu_p, lv_p), red)
            g = self.gradient_step("z0_grad", t, inner, z0, self.s.inner_lr_z, self.s.second_order_z)
            z = z0 - self.s.inner_lr_z * g
            if not (self.s.second_order_z and self.training):
                z = z.detach()  # first-order GON: the step is a constant input to the second pass
        mu, raw = head(z)
        return mu, stabilizers.variance(raw, self.s.variance)

    def forward(self, x, beta: float = 1.0):
        """Training loss: sum over frames of recon + beta * KL, mean over the batch (algorithm 3)."""
        self.watch = []
        carry = self.init_carry(x)
        recon = kl = x.new_zeros(())
        for t in range(x.shape[1]):
            mu_p, lv_p, carry = self.prior(carry, t)
            mu, lv = self.posterior(x[:, t], mu_p, lv_p, t)
            r = sample(mu, lv, self.training)
            recon = recon + recon_per_pixel(self.decoder(r), x[:, t], self.cfg.model.recon).flatten(1).sum(1).mean()
            kl = kl + stabilizers.free_bits(kl_normal(mu, lv, mu_p, lv_p), self.s.free_bits)
            carry = self.advance(carry, r, t)
        loss = recon + beta * kl
        extra = self.extra_loss(carry, beta)
        if extra is not None:
            loss = loss + extra
        return loss, {"recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def predict(self, x, context: int = 5) -> dict[str, torch.Tensor]:
        """Frame probabilities for the thesis' evaluations, in eval mode (means, no sampling): posterior (table 3.1),
        one-step prior decoded before the inference step (table 3.2; NaN at t=0, where there is no prior prediction),
        and a rollout that sees `context` frames and then runs on the prior alone (figure 3.4)."""
        was_training = self.training
        self.eval()
        try:
            out = {k: torch.full_like(x, float("nan")) for k in ("posterior", "prior", "rollout")}
            carry = self.init_carry(x)
            for t in range(x.shape[1]):
                mu_p, lv_p, carry = self.prior(carry, t)
                if t > 0:
                    out["prior"][:, t] = torch.sigmoid(self.decoder(mu_p))
                mu, _ = self.posterior(x[:, t], mu_p, lv_p, t)
                out["posterior"][:, t] = torch.sigmoid(self.decoder(mu))
                carry = self.advance(carry, mu, t)
            carry = self.init_carry(x)
            for t in range(x.shape[1]):
                mu_p, lv_p, carry = self.prior(carry, t)
                seen = t < context
                r = self.posterior(x[:, t], mu_p, lv_p, t)[0] if seen else mu_p
                out["rollout"][:, t] = torch.sigmoid(self.decoder(r))
                carry = self.advance(carry, r, t, infer=seen)
            return out
        finally:
            self.watch = []
            self.train(was_training)
