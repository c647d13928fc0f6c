"""GOPC-1, VAE-1 and GOPC-2: parameter budgets, the gradient-origin step against a hand computation,
first- vs second-order GON, every GOPC-2 stabilizer, config conflicts, predict(), and the naive GOPC-2
blow-up. Tiny sizes throughout (frame 32, r_dim 8, ngf 4), CPU only."""
import math

import pytest
import torch
import torch.nn.functional as F

from gopc import config as C
from gopc import stabilizers
from gopc.errors import ConfigError
from gopc.gopc1 import GOPC1
from gopc.gopc2 import GOPC2
from gopc.models import build_model, n_params
from gopc.nn import kl_normal, kl_std_normal
from gopc.stabilizers import STAYS_FINITE
from gopc.vae1 import VAE1

R, RH, S, P = 8, 4, 32, 32 * 32  # r_dim, rh_dim, frame size, pixels per frame
TINY = ["data.frame_size=32", f"model.r_dim={R}", "model.ngf=4", "model.lstm_dim=16",
        f"model.rh_dim={RH}", "model.hyper_hidden=8"]


def make(kind="gopc1", *overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(C.load(None, [f"model.kind={kind}", *TINY, *overrides]))


def frames(B=3, T=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, 1, S, S, generator=g)


def loss_and_grads(model, x, seed=123, params=None):
    """Loss and its parameter gradients, with sampling noise fixed by the seed."""
    model.train()
    torch.manual_seed(seed)
    loss, parts = model(x)
    params = list(model.parameters()) if params is None else params
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), parts, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class Recorder(torch.nn.Module):
    """Wraps a Gaussian head and records every latent it is applied to (z0, then the stepped z)."""

    def __init__(self, head):
        super().__init__()
        self.head, self.seen = head, []

    def forward(self, z):
        self.seen.append(z)
        return self.head(z)


# ---------------------------------------------------------------------------------------------------
# 1. Parameter budgets.

@pytest.mark.parametrize("kind,exact,thesis", [("gopc1", 3_376_113, 3.53e6), ("vae1", 4_073_185, 3.99e6)])
def test_default_parameter_counts_match_the_thesis(kind, exact, thesis):
    n = n_params(build_model(C.load(None, [f"model.kind={kind}"])))
    assert abs(n - thesis) / thesis < 0.10, f"{kind}: {n} is not within 10% of the thesis' {thesis:.3g}"
    assert n == exact, f"{kind}: parameter count changed from {exact} to {n}"


def test_vae1_swaps_the_gradient_origin_head_for_an_encoder():
    g, v = make("gopc1"), make("vae1")
    assert isinstance(g, GOPC1) and isinstance(v, VAE1) and isinstance(make("gopc2"), GOPC2)
    assert hasattr(g, "q_head") and not hasattr(v, "q_head") and hasattr(v, "encoder")


# ---------------------------------------------------------------------------------------------------
# 2. The gradient-origin step, by hand.

def hand_inner_grads(model, x_t, mu_p, lv_p):
    """Recon and KL gradients at z0 = 0, computed from the pieces (eval mode: the decoder sees mu0)."""
    head = model.q_head
    z0 = torch.zeros(x_t.shape[0], R, requires_grad=True)
    mu0 = F.linear(z0, head.mu.weight, head.mu.bias)
    lv0 = F.linear(z0, head.raw.weight, head.raw.bias)  # variance law 'exp': raw is the log-variance
    logits = model.decoder(mu0)
    bce = (logits.clamp(min=0) - logits * x_t + torch.log1p(torch.exp(-logits.abs())))
    recon = bce.flatten(1).sum(1).mean()
    kl = (0.5 * (lv_p - lv0 + (lv0.exp() + (mu0 - mu_p) ** 2) / lv_p.exp() - 1)).sum(1).mean()
    (g_recon,) = torch.autograd.grad(recon, z0, retain_graph=True)
    (g_kl,) = torch.autograd.grad(kl, z0)
    return g_recon, g_kl


def stepped_z(model, x_t, mu_p, lv_p):
    rec = Recorder(model.q_head)
    mu, lv = model.gon_posterior(rec, x_t, mu_p, lv_p, 0)
    assert len(rec.seen) == 2 and torch.equal(rec.seen[0], torch.zeros_like(rec.seen[0]))
    return rec.seen[1].detach(), mu, lv


def test_gon_posterior_is_one_gradient_step_from_the_origin():
    model = make("gopc1").eval()
    x_t = frames(B=3, T=1)[:, 0]
    torch.manual_seed(5)
    mu_p, lv_p = torch.randn(3, R), 0.3 * torch.randn(3, R)
    g_recon, g_kl = hand_inner_grads(model, x_t, mu_p, lv_p)
    assert g_recon.abs().max() > 0 and g_kl.abs().max() > 0

    z, mu, lv = stepped_z(model, x_t, mu_p, lv_p)
    torch.testing.assert_close(z, -(g_recon + g_kl), rtol=1e-4, atol=1e-6)
    # the posterior is the heads applied to the stepped z
    h = model.q_head
    torch.testing.assert_close(mu, F.linear(z, h.mu.weight, h.mu.bias), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lv, F.linear(z, h.raw.weight, h.raw.bias), rtol=1e-4, atol=1e-5)

    # inner_lr_z scales the step linearly
    model.s.inner_lr_z = 0.5
    z_half, _, _ = stepped_z(model, x_t, mu_p, lv_p)
    torch.testing.assert_close(z_half, 0.5 * z, rtol=1e-5, atol=1e-7)
    model.s.inner_lr_z = 1.0

    # 'mean' divides the recon gradient by the pixel count and the KL gradient by r_dim
    model.s.inner_reduction = "mean"
    z_mean, _, _ = stepped_z(model, x_t, mu_p, lv_p)
    torch.testing.assert_close(z_mean, -(g_recon / P + g_kl / R), rtol=1e-4, atol=1e-7)


def test_inner_reduction_mean_divides_the_step_by_the_element_count_when_kl_is_flat():
    model = make("gopc1").eval()
    x_t = frames(B=2, T=1, seed=3)[:, 0]
    # prior = q at the origin: the KL is at its minimum, so only the reconstruction drives the step
    mu_p, lv_p = model.q_head.mu.bias.detach().expand(2, R), model.q_head.raw.bias.detach().expand(2, R)
    z_sum, _, _ = stepped_z(model, x_t, mu_p, lv_p)
    model.s.inner_reduction = "mean"
    z_mean, _, _ = stepped_z(model, x_t, mu_p, lv_p)
    assert z_sum.abs().max() > 0
    torch.testing.assert_close(z_sum, P * z_mean, rtol=1e-4, atol=1e-4 * z_sum.abs().max().item())


def test_inner_step_averages_the_batch():
    """inner_reduction: per-sample sum (or mean), then the batch mean, so a sample's step shrinks as 1/B."""
    e = torch.arange(24.0).view(2, 3, 4)
    assert stabilizers.inner_reduction(e, "sum").item() == pytest.approx(e.sum().item() / 2)
    assert stabilizers.inner_reduction(e, "mean").item() == pytest.approx(e.mean().item())
    model = make("gopc1").eval()
    x1 = frames(B=1, T=1, seed=4)[:, 0]
    mu_p, lv_p = torch.zeros(1, R), torch.zeros(1, R)
    z1, _, _ = stepped_z(model, x1, mu_p, lv_p)
    z2, _, _ = stepped_z(model, x1.repeat(2, 1, 1, 1), mu_p.repeat(2, 1), lv_p.repeat(2, 1))
    torch.testing.assert_close(z2[0], z1[0] / 2, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# 3. First- vs second-order GON.

def test_second_order_z_changes_the_parameter_gradient():
    x = frames(B=2, T=3)
    model = make("gopc1")
    params = [model.decoder.net[0].weight, model.q_head.mu.weight]
    _, _, g2 = loss_and_grads(model, x, params=params)
    model.s.second_order_z = False
    loss1, _, g1 = loss_and_grads(model, x, params=params)
    model.s.second_order_z = True
    loss2, _, _ = loss_and_grads(model, x, params=params)
    assert torch.equal(loss1, loss2), "the order of the step changes gradients, not the forward value"
    for a, b in zip(g1, g2):
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_first_order_z_step_carries_no_graph_to_the_parameters():
    x_t = frames(B=2, T=1)[:, 0]
    mu_p, lv_p = torch.zeros(2, R), torch.zeros(2, R)
    model = make("gopc1").train()
    w = model.decoder.net[0].weight
    rec = Recorder(model.q_head)
    torch.manual_seed(9)  # the same sampling noise in both orders
    model.gon_posterior(rec, x_t, mu_p, lv_p, 0)
    z = rec.seen[1]
    (dz,) = torch.autograd.grad(z.sum(), w, allow_unused=True)
    assert dz is not None and dz.abs().max() > 0, "second order: z depends on the decoder through g"

    model.s.second_order_z = False
    rec = Recorder(model.q_head)
    torch.manual_seed(9)
    model.gon_posterior(rec, x_t, mu_p, lv_p, 0)
    z1 = rec.seen[1]
    assert not z1.requires_grad and z1.grad_fn is None
    torch.testing.assert_close(z1, z.detach())  # the same step value, only the graph differs


STABLE2 = [f"{k}={v}" for k, v in STAYS_FINITE.items()]  # a GOPC-2 that stays finite (gopc/stabilizers.py)


def test_second_order_h_changes_the_parameter_gradient():
    x = frames(B=2, T=4)
    model = make("gopc2", *STABLE2)
    params = [model.transition.hyper[0].weight]
    loss2, _, g2 = loss_and_grads(model, x, params=params)
    model.s.second_order_h = False
    loss1, _, g1 = loss_and_grads(model, x, params=params)
    assert torch.isfinite(loss1) and torch.equal(loss1, loss2)
    assert not torch.allclose(g1[0], g2[0], rtol=1e-3, atol=1e-7)


def advance_once(model, rh, r_prev, r, t=1):
    carry = {"rh": rh, "r": r_prev, "zeros": torch.zeros_like(r), "penalty": torch.zeros(())}
    return model.advance(carry, r, t)["rh"]


def rh_inputs(B=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)


def test_first_order_h_step_carries_no_graph_to_the_hypernetwork():
    model = make("gopc2", *STABLE2).train()
    r_prev, r = rh_inputs()
    w = model.transition.hyper[0].weight
    rh2 = advance_once(model, torch.zeros(3, RH), r_prev, r)
    (d2,) = torch.autograd.grad(rh2.sum(), w, allow_unused=True)
    assert d2 is not None and d2.abs().max() > 0
    model.s.second_order_h = False
    rh1 = advance_once(model, torch.zeros(3, RH), r_prev, r)
    (d1,) = torch.autograd.grad(rh1.sum(), w, allow_unused=True)
    assert d1 is None or d1.abs().max() == 0
    torch.testing.assert_close(rh1.detach(), rh2.detach())


# ---------------------------------------------------------------------------------------------------
# 4. GOPC-2 stabilizers.

def hand_rh_grad(model, rh, r_prev, r, reduction="sum"):
    """Gradient of ||r - r_hat(rh)||^2 + KL(N(rh, e^rh_raw) || N(0, I)) at rh, from the pieces."""
    rh = rh.detach().requires_grad_()
    r_hat, _ = model.transition(r_prev, rh)
    lv = model.rh_raw
    sq = (r - r_hat) ** 2
    kl = 0.5 * (lv.exp() + rh ** 2 - 1 - lv)
    red = (lambda e: e.sum(1).mean()) if reduction == "sum" else (lambda e: e.mean(1).mean())
    (g,) = torch.autograd.grad(red(sq) + red(kl), rh)
    return g


@pytest.mark.parametrize("act,fn", [
    ("none", lambda o: o), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
    ("layernorm", lambda o: F.layer_norm(o, (R,))),
])
def test_out_act_is_applied_to_V_r_prev(act, fn):
    model = make("gopc2", f"stab.out_act={act}")
    r_prev, _ = rh_inputs()
    rh = torch.randn(3, RH)
    out, V = model.transition(r_prev, rh)
    V_hand = model.transition.matrices(rh)
    torch.testing.assert_close(V, V_hand)
    raw = torch.einsum("bij,bj->bi", V_hand, r_prev)
    torch.testing.assert_close(out, fn(raw), rtol=1e-5, atol=1e-6)
    if act != "none":
        assert not torch.allclose(out, raw, atol=1e-3)


@pytest.mark.parametrize("act,fn", [("none", lambda o: o), ("sigmoid", torch.sigmoid)])
def test_residual_transition_adds_r_prev_and_starts_as_identity(act, fn):
    model = make("gopc2", "stab.residual=true", f"stab.out_act={act}")
    last = model.transition.hyper[-1]
    assert last.weight.abs().max() == 0 and last.bias.abs().max() == 0
    r_prev, _ = rh_inputs()
    rh = torch.randn(3, RH)
    out, _ = model.transition(r_prev, rh)
    if act == "none":
        assert torch.equal(out, r_prev), "zeroed last hyper layer + no out_act: the identity transition"
    else:
        torch.testing.assert_close(out, r_prev + 0.5)
    with torch.no_grad():
        last.weight.normal_(0, 0.3)
    out, V = model.transition(r_prev, rh)
    torch.testing.assert_close(out, r_prev + fn(torch.einsum("bij,bj->bi", V, r_prev)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, r_prev, atol=1e-3)


@pytest.mark.parametrize("act,fn", [
    ("none", lambda w: w), ("softmax", lambda w: w.softmax(-1)), ("relu", F.relu), ("tanh", torch.tanh),
])
def test_mixture_V_is_the_activated_weighting_of_the_bases(act, fn):
    k = 3
    model = make("gopc2", "model.hyper_form=mixture", f"model.mixture_k={k}", f"stab.mixture_act={act}")
    tr = model.transition
    assert tr.bases.shape == (k, R, R) and tr.hyper[-1].out_features == k
    rh = 2 * torch.randn(5, RH)
    h = tr.hyper(rh)
    w = fn(h)
    V = tr.matrices(rh)
    torch.testing.assert_close(V, (w[:, :, None, None] * tr.bases[None]).sum(1), rtol=1e-5, atol=1e-6)
    if act == "softmax":
        torch.testing.assert_close(w.sum(-1), torch.ones(5))
    if act == "relu":
        assert (h < 0).any(), "the case must exercise the negative side of relu"


def one_hot_V(tr, k):
    """V for mixture weight e_k (mixture_act none): set the hyper output to the constant e_k."""
    with torch.no_grad():
        tr.hyper[-1].weight.zero_()
        tr.hyper[-1].bias.zero_()
        tr.hyper[-1].bias[k] = 1.0
    return tr.matrices(torch.randn(2, RH))[0]


def test_basis_norm_normalize_gives_unit_frobenius_bases():
    k = 3
    model = make("gopc2", "model.hyper_form=mixture", f"model.mixture_k={k}", "stab.basis_norm=normalize")
    tr = model.transition
    with torch.no_grad():
        tr.bases.mul_(torch.tensor([5.0, 0.1, 1.0])[:, None, None])
    for i in range(k):
        V = one_hot_V(tr, i)
        assert torch.linalg.matrix_norm(V).item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(V, tr.bases[i] / tr.bases[i].norm(), rtol=1e-5, atol=1e-6)


def test_basis_norm_spectral_caps_the_largest_singular_value_at_one():
    k = 2
    model = make("gopc2", "model.hyper_form=mixture", f"model.mixture_k={k}", "stab.basis_norm=spectral")
    tr = model.transition
    with torch.no_grad():
        tr.bases[0].mul_(10.0)  # well above 1: scaled down to exactly 1
        tr.bases[1].mul_(0.1 / torch.linalg.matrix_norm(tr.bases[1], ord=2))  # 0.1: left alone
    V0, V1 = one_hot_V(tr, 0), one_hot_V(tr, 1)
    assert torch.linalg.matrix_norm(V0, ord=2).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.linalg.matrix_norm(V0, ord=2).item() <= 1 + 1e-5
    torch.testing.assert_close(V1, tr.bases[1].detach())
    # any softmax mixture of spectrally normalised bases is a contraction too
    model2 = make("gopc2", "model.hyper_form=mixture", "model.mixture_k=4", "stab.basis_norm=spectral",
                  "stab.mixture_act=softmax")
    with torch.no_grad():
        model2.transition.bases.mul_(20.0)
    V = model2.transition.matrices(3 * torch.randn(6, RH))
    assert (torch.linalg.matrix_norm(V, ord=2) <= 1 + 1e-5).all()


def test_weight_act_tanh_bounds_V():
    model = make("gopc2", "stab.weight_act=tanh")
    tr = model.transition
    with torch.no_grad():
        tr.hyper[-1].weight.mul_(50.0)
    rh = torch.randn(4, RH)
    raw = tr.hyper(rh).view(4, R, R)
    assert raw.abs().max() > 1.5, "the case must have generated weights outside [-1, 1]"
    V = tr.matrices(rh)
    assert V.abs().max() <= 1.0
    torch.testing.assert_close(V, torch.tanh(raw))


def test_weight_act_layernorm_standardises_V_per_sample():
    model = make("gopc2", "stab.weight_act=layernorm")
    tr = model.transition
    with torch.no_grad():
        tr.hyper[-1].bias.add_(3.0)  # raw weights far from mean 0, std 1
    rh = torch.randn(4, RH)
    raw = tr.hyper(rh)
    assert raw.mean(1).abs().min() > 1.0
    V = tr.matrices(rh).flatten(1)
    torch.testing.assert_close(V.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.std(1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_weight_penalty_adds_lambda_times_the_summed_frobenius_norms():
    T, lam = 4, 0.5
    x = frames(B=3, T=T)
    model = make("gopc2", *STABLE2).train()
    seen = []
    prior = model.prior

    def recording_prior(carry, t):
        if t > 0:
            seen.append(model.transition.matrices(carry["rh"]).detach())
        return prior(carry, t)

    model.prior = recording_prior
    torch.manual_seed(11)
    loss0, _ = model(x)
    seen.clear()
    model.s.weight_penalty = lam
    torch.manual_seed(11)
    loss_l, _ = model(x)
    assert len(seen) == T - 1
    penalty = sum(V.pow(2).sum((1, 2)).mean() for V in seen)
    assert penalty > 1e-2
    assert (loss_l - loss0).item() == pytest.approx(lam * penalty.item(), rel=1e-4, abs=2e-3)


def test_h_grad_clips_and_normalises_a_known_gradient():
    g = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.1, 0.2, 0.0, -0.2]])
    assert torch.equal(stabilizers.h_grad(g, "none", 1.0), g)
    torch.testing.assert_close(stabilizers.h_grad(g, "clip_value", 1.0), torch.tensor([[1.0, -1.0, 0, 0], [0.1, 0.2, 0, -0.2]]))
    torch.testing.assert_close(stabilizers.h_grad(g, "clip_norm", 1.0), torch.tensor([[0.6, -0.8, 0, 0], [0.1, 0.2, 0, -0.2]]))
    out = stabilizers.h_grad(g, "normalize", 1.0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out[1], g[1] / 0.3)
    torch.testing.assert_close(stabilizers.h_grad(g, "normalize", 2.5).norm(dim=1), torch.full((2,), 2.5))


@pytest.mark.parametrize("how", ["clip_value", "clip_norm", "normalize"])
def test_h_grad_limit_shapes_the_rh_step(how):
    lr, c = 0.3, 0.05
    model = make("gopc2", *STABLE2, f"stab.h_grad={how}", f"stab.h_grad_limit={c}", f"stab.inner_lr_h={lr}")
    r_prev, r = rh_inputs()
    rh0 = torch.zeros(3, RH)
    g = hand_rh_grad(model, rh0, r_prev, r)
    step = advance_once(model, rh0, r_prev, r).detach()  # rh starts at 0: rh_new = -lr * limit(g)
    if how == "clip_value":
        assert g.abs().max() > c
        torch.testing.assert_close(step, -lr * g.clamp(-c, c))
        assert step.abs().max() <= lr * c + 1e-7
    elif how == "clip_norm":
        assert (g.norm(dim=1) > c).all()
        assert (step.norm(dim=1) <= lr * c * (1 + 1e-5)).all()
        torch.testing.assert_close(step, -lr * c * g / g.norm(dim=1, keepdim=True))
    else:
        torch.testing.assert_close(step.norm(dim=1), torch.full((3,), lr * c))
        torch.testing.assert_close(step, -lr * c * g / g.norm(dim=1, keepdim=True))
    # and the model's forward changes when the limit is on
    x = frames(B=2, T=4)
    loss_on, _, _ = loss_and_grads(model, x, params=[model.trans_raw])
    model.s.h_grad = "none"
    loss_off, _, _ = loss_and_grads(model, x, params=[model.trans_raw])
    assert not torch.allclose(loss_on, loss_off)


@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_inner_lr_h_first_update_is_minus_lr_times_the_gradient(lr):
    model = make("gopc2", *STABLE2, f"stab.inner_lr_h={lr}")
    r_prev, r = rh_inputs()
    rh0 = torch.zeros(3, RH)
    g = hand_rh_grad(model, rh0, r_prev, r)
    assert g.abs().max() > 0
    torch.testing.assert_close(advance_once(model, rh0, r_prev, r).detach(), -lr * g)
    # with inner_reduction 'mean' the squared error is divided by r_dim and the KL by rh_dim
    model.s.inner_reduction = "mean"
    g_mean = hand_rh_grad(model, rh0, r_prev, r, "mean")
    torch.testing.assert_close(advance_once(model, rh0, r_prev, r).detach(), -lr * g_mean)


def test_rh_step_only_runs_after_the_first_frame_and_when_inferring():
    model = make("gopc2", *STABLE2)
    r_prev, r = rh_inputs()
    rh0 = torch.randn(3, RH)
    assert torch.equal(advance_once(model, rh0, r_prev, r, t=0), rh0)
    carry = {"rh": rh0, "r": r_prev}
    assert torch.equal(model.advance(carry, r, 2, infer=False)["rh"], rh0)
    assert not torch.equal(advance_once(model, rh0, r_prev, r, t=2), rh0)


@pytest.mark.parametrize("n", [1, 3])
def test_n_steps_h_records_one_rh_grad_per_step_and_frame(n):
    T = 4
    model = make("gopc2", *STABLE2, f"stab.n_steps_h={n}", "stab.inner_lr_h=0.1")
    torch.manual_seed(0)
    loss, _ = model(frames(B=2, T=T))
    assert torch.isfinite(loss)
    sites = [s for s, _, _ in model.watch]
    assert sites.count("rh_grad") == n * (T - 1)
    assert sites.count("z0_grad") == T
    assert sorted(t for s, t, _ in model.watch if s == "rh_grad") == sorted(list(range(1, T)) * n)
    # two steps are two real updates: the second starts where the first ended
    if n == 3:
        r_prev, r = rh_inputs()
        model.s.inner_lr_h = 0.1
        one = make("gopc2", *STABLE2, "stab.inner_lr_h=0.1")
        rh1 = advance_once(one, torch.zeros(3, RH), r_prev, r).detach()
        rh2 = rh1 - 0.1 * hand_rh_grad(one, rh1, r_prev, r)
        rh3 = rh2 - 0.1 * hand_rh_grad(one, rh2, r_prev, r)
        torch.testing.assert_close(advance_once(model, torch.zeros(3, RH), r_prev, r).detach(), rh3)


def test_rh_truncate_cuts_the_direct_rh_path():
    r_prev, r = rh_inputs()
    for k, t, cut in [(0, 1, False), (0, 2, False), (1, 1, True), (1, 3, True), (2, 1, False), (2, 2, True)]:
        model = make("gopc2", *STABLE2, f"stab.rh_truncate={k}")
        rh_prev = (0.5 * torch.randn(3, RH)).requires_grad_()
        rh = advance_once(model, rh_prev, r_prev, r, t=t)
        (d,) = torch.autograd.grad(rh.sum(), rh_prev, allow_unused=True)
        if cut:
            assert d is None, f"rh_truncate={k}, t={t}: r^H still depends on the previous frame's r^H"
        else:
            assert d is not None and d.abs().max() > 0, f"rh_truncate={k}, t={t}"


def test_rh_truncate_changes_the_hypernetwork_gradient():
    x = frames(B=2, T=5)
    model = make("gopc2", *STABLE2)
    params = [model.transition.hyper[0].weight]
    _, _, g_full = loss_and_grads(model, x, params=params)
    model.s.rh_truncate = 1
    loss_cut, _, g_cut = loss_and_grads(model, x, params=params)
    assert torch.isfinite(loss_cut) and torch.isfinite(g_cut[0]).all()
    assert not torch.allclose(g_cut[0], g_full[0], rtol=1e-3, atol=1e-7)


def test_rh_truncate_is_a_backward_only_change():
    """The r^H step is down grad_{r^H} ||r_t - r_hat(r^H)||^2 with r_t given. Cutting the r^H path must not
    change any forward value: the same loss and the same recorded inner-gradient norms."""
    x = frames(B=2, T=5)
    model = make("gopc2", *STABLE2).train()
    out = {}
    for k in (0, 1):
        model.s.rh_truncate = k
        torch.manual_seed(123)
        loss, _ = model(x)
        out[k] = loss.item(), [n.item() for s, _, n in model.watch if s == "rh_grad"]
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)


@pytest.mark.parametrize("kind", ["gopc1", "vae1"])
def test_beta_weights_the_kl(kind):
    x = frames(B=2, T=3)
    model = make(kind).train()
    torch.manual_seed(3)
    loss, parts = model(x, beta=0.5)
    assert parts["kl"] > 0
    torch.testing.assert_close(loss.detach(), parts["recon"] + 0.5 * parts["kl"])
    torch.manual_seed(3)
    loss0, parts0 = model(x, beta=0.0)
    torch.testing.assert_close(loss0.detach(), parts0["recon"])
    torch.testing.assert_close(parts0["kl"], parts["kl"])


def test_gopc2_beta_also_weights_the_rh_kl():
    x = frames(B=2, T=3)
    model = make("gopc2", *STABLE2).train()
    with torch.no_grad():
        model.rh_raw.fill_(-1.0)  # q(r^H) != N(0, I) even at rh = 0, so the r^H KL is nonzero
    extra = {}
    orig = model.extra_loss

    def rec(carry, beta):
        lv = model.rh_raw
        extra[beta] = (0.5 * (lv.exp() + carry["rh"] ** 2 - 1 - lv)).sum(1).mean().detach()
        return orig(carry, beta)

    model.extra_loss = rec
    for beta in (0.5, 1.0):
        torch.manual_seed(3)
        loss, parts = model(x, beta=beta)
        assert extra[beta] > 0
        torch.testing.assert_close(loss.detach(), parts["recon"] + beta * (parts["kl"] + extra[beta]))


def test_free_bits_floor_each_dimensions_batch_mean_kl():
    kl = torch.tensor([[0.1, 2.0, 0.0], [0.3, 0.0, 0.0]], requires_grad=True)  # batch means 0.2, 1.0, 0
    assert stabilizers.free_bits(kl, 0.0).item() == pytest.approx(1.2)
    out = stabilizers.free_bits(kl, 0.5)
    assert out.item() == pytest.approx(0.5 + 1.0 + 0.5)
    (g,) = torch.autograd.grad(out, kl)
    # floored dims get no gradient; the free dim keeps the batch-mean gradient
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.0]]))


def test_free_bits_apply_to_the_r_kl_in_forward():
    x = frames(B=2, T=3)
    model = make("gopc1").train()
    torch.manual_seed(3)
    _, p0 = model(x)
    model.s.free_bits = 5.0  # above every dim's KL: the floor is the whole KL
    torch.manual_seed(3)
    _, p1 = model(x)
    assert p0["kl"] < 3 * R * 5.0
    torch.testing.assert_close(p1["kl"], torch.tensor(3 * R * 5.0))


def test_free_bits_h_floor_the_rh_kl_in_extra_loss():
    model = make("gopc2", "stab.free_bits_h=0.25")
    carry = {"rh": torch.zeros(3, RH), "penalty": torch.zeros(())}
    # q(r^H) = N(0, I) exactly: zero KL, floored at 0.25 per dim
    assert model.extra_loss(carry, 1.0).item() == pytest.approx(0.25 * RH)
    assert model.extra_loss(carry, 0.5).item() == pytest.approx(0.5 * 0.25 * RH)
    rh = torch.tensor([[2.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.1, 0.0], [1.0, 0.0, 0.1, 0.0]])
    per_dim = (0.5 * rh ** 2).mean(0)  # rh_raw = 0
    carry["rh"] = rh
    expected = per_dim.clamp(min=0.25).sum()
    assert model.extra_loss(carry, 1.0).item() == pytest.approx(expected.item())
    model.s.free_bits_h = 0.0
    assert model.extra_loss(carry, 1.0).item() == pytest.approx(per_dim.sum().item())


def test_variance_laws():
    raw = torch.tensor([-30.0, -10.5, -1.0, 0.0, 2.0, 10.5, 30.0])
    torch.testing.assert_close(stabilizers.variance(raw, "clamped"), raw.clamp(-10, 10))
    assert stabilizers.variance(raw, "clamped").min() == -10 and stabilizers.variance(raw, "clamped").max() == 10
    torch.testing.assert_close(stabilizers.variance(raw, "softplus"), 2 * torch.log(torch.log1p(raw.exp()) + 1e-4))
    assert stabilizers.variance(raw, "softplus").min().item() == pytest.approx(2 * math.log(1e-4), rel=1e-4)
    assert torch.equal(stabilizers.variance(raw, "exp"), raw)


def test_variance_law_reaches_the_model_heads():
    x_t = frames(B=2, T=1)[:, 0]
    model = make("gopc1", "stab.variance=clamped").eval()
    with torch.no_grad():
        model.q_head.raw.bias.fill_(40.0)
    _, lv = model.gon_posterior(model.q_head, x_t, torch.zeros(2, R), torch.zeros(2, R), 0)
    assert lv.max().item() == 10.0


def test_kl_helpers_against_closed_forms():
    mu, lv = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.3]])
    torch.testing.assert_close(kl_std_normal(mu, lv), kl_normal(mu, lv, torch.zeros(1, 2), torch.zeros(1, 2)))
    assert kl_normal(mu, lv, mu, lv).abs().max() < 1e-7
    # KL(N(1, 1) || N(0, e^2)) = 0.5 * (2 - 0 + (1 + 1) e^-2 - 1)
    assert kl_normal(torch.ones(1), torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0)).item() == \
        pytest.approx(0.5 * (2 + 2 * math.exp(-2) - 1))


def test_hyper_layernorm_inserts_a_layernorm_after_the_first_layer():
    plain = make("gopc2", seed=4)
    normed = make("gopc2", "stab.hyper_layernorm=true", seed=4)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in plain.transition.hyper)
    ln = [m for m in normed.transition.hyper if isinstance(m, torch.nn.LayerNorm)]
    assert len(ln) == 1 and normed.transition.hyper[1] is ln[0]
    first, last = normed.transition.hyper[0], normed.transition.hyper[-1]
    # same seed, same linear layers (LayerNorm draws no random numbers)
    assert torch.equal(first.weight, plain.transition.hyper[0].weight)
    rh = 3 * torch.randn(4, RH)
    hand = last(F.elu(F.layer_norm(first(rh), (first.out_features,))))
    torch.testing.assert_close(normed.transition.hyper(rh), hand)
    assert not torch.allclose(normed.transition.hyper(rh), plain.transition.hyper(rh), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# 5. Conflicting stabilizers are refused, naming the field.

@pytest.mark.parametrize("overrides,field", [
    (["model.kind=gopc2", "stab.mixture_act=softmax"], "stab.mixture_act"),
    (["model.kind=gopc2", "stab.basis_norm=spectral"], "stab.basis_norm"),
    (["model.kind=gopc1", "stab.out_act=sigmoid"], "stab.out_act"),
    (["model.kind=vae1", "stab.residual=true"], "stab.residual"),
    (["model.kind=gopc1", "stab.rh_truncate=2"], "stab.rh_truncate"),
    (["model.kind=gopc1", "stab.weight_penalty=0.1"], "stab.weight_penalty"),
    (["model.kind=gopc2", "stab.h_grad=clip_norm", "stab.h_grad_limit=0"], "stab.h_grad_limit"),
    (["model.kind=gopc2", "stab.out_act=relu"], "stab.out_act"),
    (["model.kind=gopc2", "stab.n_steps_h=0"], "stab.n_steps_h"),
])
def test_conflicting_stabilizers_are_refused(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        C.load(None, overrides)


def test_compatible_stabilizers_are_accepted():
    cfg = C.load(None, ["model.kind=gopc2", "model.hyper_form=mixture", "stab.mixture_act=softmax",
                        "stab.basis_norm=spectral", "stab.out_act=sigmoid", "stab.h_grad=normalize"])
    assert cfg.stab.mixture_act == "softmax" and cfg.model.hyper_form == "mixture"
    assert C.load(None, ["model.kind=gopc1", "stab.inner_lr_z=0.5", "stab.free_bits=0.1"]).stab.inner_lr_z == 0.5


# ---------------------------------------------------------------------------------------------------
# 6. predict().

@pytest.mark.parametrize("kind,extra", [("gopc1", []), ("vae1", []), ("gopc2", STABLE2)])
@pytest.mark.parametrize("training", [True, False])
def test_predict(kind, extra, training):
    T, context = 5, 2
    x = frames(B=2, T=T)
    model = make(kind, *extra)
    model.train(training)
    out = model.predict(x, context=context)
    assert model.training is training
    assert model.watch == []
    assert set(out) == {"posterior", "prior", "rollout"}
    for k, v in out.items():
        assert v.shape == x.shape, k
    assert torch.isnan(out["prior"][:, 0]).all()
    for v in (out["posterior"], out["prior"][:, 1:], out["rollout"]):
        assert torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
    torch.testing.assert_close(out["rollout"][:, :context], out["posterior"][:, :context], rtol=0, atol=0)
    assert not torch.equal(out["rollout"][:, context:], out["posterior"][:, context:])
    # deterministic: eval mode, means, no sampling
    again = model.predict(x, context=context)
    for k in out:
        torch.testing.assert_close(again[k], out[k], equal_nan=True)


def test_predict_prior_is_the_decoded_prior_mean():
    x = frames(B=2, T=3)
    model = make("gopc1")
    out = model.predict(x, context=3)
    model.eval()
    with torch.no_grad():
        carry = model.init_carry(x)
        mu_p, lv_p, carry = model.prior(carry, 0)
        mu, _ = model.posterior(x[:, 0], mu_p, lv_p, 0)
        torch.testing.assert_close(out["posterior"][:, 0], torch.sigmoid(model.decoder(mu)))
        carry = model.advance(carry, mu, 0)
        mu_p, _, _ = model.prior(carry, 1)
        torch.testing.assert_close(out["prior"][:, 1], torch.sigmoid(model.decoder(mu_p)))


# ---------------------------------------------------------------------------------------------------
# 7. The naive GOPC-2 diverges.

def test_naive_gopc2_goes_non_finite_within_the_first_forward():
    """Thesis defaults (full hypernetwork, unit inner steps, no stabilizer) at r_dim 32, frame 32, T 6:
    the r^H inner gradient norm grows geometrically over frames (seed 0: ~9, 39, 205, 1e4, then NaN at
    t=5) and the loss is NaN already in the first forward pass, before any optimizer step."""
    cfg = C.load(None, ["model.kind=gopc2", "model.r_dim=32", "data.frame_size=32", "data.seq_len=6"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.rand(4, 6, 1, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    first_bad = None
    for step in range(3):
        loss, _ = model(x)
        norms = torch.stack([n for _, _, n in model.watch])
        if not torch.isfinite(loss) or not torch.isfinite(norms).all():
            first_bad = step
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first_bad is not None, "the naive GOPC-2 stayed finite"
    assert first_bad == 0
    rh = [n.item() for s, _, n in model.watch if s == "rh_grad"]
    assert len(rh) == 5
    finite = [v for v in rh if math.isfinite(v)]
    assert len(finite) >= 2 and finite == sorted(finite) and finite[-1] > 10 * finite[0], rh


def test_sigmoid_out_act_keeps_the_same_first_forward_finite():
    cfg = C.load(None, ["model.kind=gopc2", "model.r_dim=32", "data.frame_size=32", "data.seq_len=6",
                        "stab.out_act=sigmoid"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    loss, _ = model(torch.rand(4, 6, 1, 32, 32))
    assert torch.isfinite(loss)
    assert all(torch.isfinite(n) for _, _, n in model.watch)


# ---------------------------------------------------------------------------------------------------
# The float64 debug mode (reference notes, section 6, #22): z0 follows the input's dtype.

def test_float64_model_runs():
    model = make("gopc1").double()
    loss, _ = model(frames(B=2, T=2).double())
    assert loss.dtype == torch.float64
