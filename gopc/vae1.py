"""VAE-1 (thesis 3.4.2): GOPC-1's generative model, a conv encoder seeing the current frame only (fairest baseline)."""
from __future__ import annotations

from gopc import stabilizers
from gopc.config import Config
from gopc.gopc1 import GOPC1
from gopc.nn import Encoder


class VAE1(GOPC1):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        del self.q_head  # the encoder replaces the gradient-origin heads
        self.encoder = Encoder(cfg.model.r_dim, cfg.model.ngf, cfg.data.frame_size)

    def posterior(self, x_t, mu_p, lv_p, t):
        mu, raw = self.encoder(x_t)
        return mu, stabilizers.variance(raw, self.s.variance)
