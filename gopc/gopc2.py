"""GOPC-2 (thesis chapter 4): a higher latent r^H generates the transition of r_t through a hypernetwork (as in Dynamic
Predictive Coding) and is itself inferred by gradient steps each frame.

Why it blows up (reference notes, section 6): r^H is carried across frames, so backpropagation multiplies one
(I - lr_h * Hessian) Jacobian per frame through the hypernetwork, an unrolled inner loop of T-1 steps. Every
stabilizer (gopc/stabilizers.py) attacks a factor of that product."""
from __future__ import annotations

import torch
from torch import nn

from gopc import stabilizers
from gopc.config import Config
from gopc.nn import GaussianHead, SeqModel, kl_std_normal


class Transition(nn.Module):
    """r_hat_t = out_act(V(r^H) r_{t-1}) (+ r_{t-1} when residual); V from a hypernetwork of r^H,
    either all r x r entries ('full') or a mixture of K learned bases ('mixture', as in DPC)."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, s = cfg.model, cfg.stab
        self.s, self.r, self.form = s, m.r_dim, m.hyper_form
        layers: list[nn.Module] = [nn.Linear(m.rh_dim, m.hyper_hidden)]
        if s.hyper_layernorm:
            layers.append(nn.LayerNorm(m.hyper_hidden))
        layers += [nn.ELU(), nn.Linear(m.hyper_hidden, m.r_dim ** 2 if self.form == "full" else m.mixture_k)]
        self.hyper = nn.Sequential(*layers)
        if self.form == "mixture":
            self.bases = nn.Parameter(torch.empty(m.mixture_k, m.r_dim, m.r_dim))
            for basis in self.bases.data:
                nn.init.xavier_uniform_(basis)
        self.out_norm = nn.LayerNorm(m.r_dim) if s.out_act == "layernorm" else None
        if s.residual:  # start near the identity: r_hat = r_{t-1} + out_act(0), for every mixture_act but
            # softmax, whose zero logits still weight every basis 1/K
            nn.init.zeros_(self.hyper[-1].weight)
            nn.init.zeros_(self.hyper[-1].bias)

    def matrices(self, rh):
        h = self.hyper(rh)
        if self.form == "full":
            V = h.view(-1, self.r, self.r)
        else:
            w = stabilizers.mixture_act(h, self.s.mixture_act)
            V = torch.einsum("bk,kij->bij", w, stabilizers.basis_norm(self.bases, self.s.basis_norm))
        return stabilizers.weight_act(V, self.s.weight_act)

    def forward(self, r_prev, rh):
        V = self.matrices(rh)
        out = stabilizers.out_act(torch.bmm(V, r_prev.unsqueeze(-1)).squeeze(-1), self.s.out_act, self.out_norm)
        return stabilizers.residual(r_prev, out, self.s.residual), V


class GOPC2(SeqModel):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.q_head = GaussianHead(m.r_dim, m.r_dim)
        self.transition = Transition(cfg)
        self.trans_raw = nn.Parameter(torch.zeros(m.r_dim))  # transition log-variance (learned constant)
        self.rh_raw = nn.Parameter(torch.zeros(m.rh_dim))  # q(r^H) log-variance

    def init_carry(self, x):
        carry = super().init_carry(x)
        carry["rh"] = x.new_zeros(x.shape[0], self.cfg.model.rh_dim)  # r^H starts at the origin
        carry["penalty"] = x.new_zeros(())
        return carry

    def prior(self, carry, t):
        if t == 0:
            return carry["zeros"], carry["zeros"], carry
        mu, V = self.transition(carry["r"], carry["rh"])
        if self.s.weight_penalty:
            carry["penalty"] = carry["penalty"] + stabilizers.weight_penalty(V)
        return mu, stabilizers.variance(self.trans_raw, self.s.variance).expand_as(mu), carry

    def posterior(self, x_t, mu_p, lv_p, t):
        return self.gon_posterior(self.q_head, x_t, mu_p, lv_p, t)

    def advance(self, carry, r, t, infer=True):
        """After r_t is inferred, step r^H down ||r_t - r_hat_t(r^H)||^2 + KL(q(r^H) || N(0, I))."""
        if t > 0 and infer:
            # a clone: r_t, inferred through carry["rh"], must stay a fixed target (no gradient back through it)
            rh = stabilizers.rh_truncate(carry["rh"].clone(), t, self.s.rh_truncate)
            lv_h = stabilizers.variance(self.rh_raw, self.s.variance)
            for _ in range(self.s.n_steps_h):
                with torch.enable_grad():
                    if not rh.requires_grad:
                        rh = rh.detach().requires_grad_()
                    r_hat, _ = self.transition(carry["r"], rh)
                    red = self.s.inner_reduction
                    inner = stabilizers.inner_reduction((r - r_hat) ** 2, red) \
                        + stabilizers.inner_reduction(kl_std_normal(rh, lv_h), red)
                    g = self.gradient_step("rh_grad", t, inner, rh, self.s.inner_lr_h, self.s.second_order_h)
                    rh = rh - self.s.inner_lr_h * stabilizers.h_grad(g, self.s.h_grad, self.s.h_grad_limit)
            carry["rh"] = rh
        carry["r"] = r
        return carry

    def extra_loss(self, carry, beta):
        lv_h = stabilizers.variance(self.rh_raw, self.s.variance).expand_as(carry["rh"])
        kl_h = stabilizers.free_bits(kl_std_normal(carry["rh"], lv_h), self.s.free_bits_h)
        return beta * kl_h + self.s.weight_penalty * carry["penalty"]
