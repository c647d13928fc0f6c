"""GOPC-1 (thesis chapter 3): an LSTM prior over per-frame latents; the posterior is one GON step (nn.gon_posterior)."""
from __future__ import annotations

from gopc import stabilizers
from gopc.config import Config
from gopc.nn import GaussianHead, LSTMPrior, SeqModel


class GOPC1(SeqModel):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.prior_net = LSTMPrior(m.r_dim, m.lstm_dim)
        self.q_head = GaussianHead(m.r_dim, m.r_dim)  # q's (mu, logvar) from the origin / the stepped z

    def prior(self, carry, t):
        if t == 0:  # r_1 ~ N(0, I)
            return carry["zeros"], carry["zeros"], carry
        mu, raw, carry["state"] = self.prior_net(carry["r"], carry.get("state"))
        return mu, stabilizers.variance(raw, self.s.variance), carry

    def posterior(self, x_t, mu_p, lv_p, t):
        return self.gon_posterior(self.q_head, x_t, mu_p, lv_p, t)

    def advance(self, carry, r, t, infer=True):
        carry["r"] = r  # the LSTM reads the posterior sample at t+1
        return carry
