"""Model registry: config -> model."""
from gopc.config import Config
from gopc.gopc1 import GOPC1
from gopc.gopc2 import GOPC2
from gopc.nn import SeqModel
from gopc.vae1 import VAE1

MODELS = {"gopc1": GOPC1, "vae1": VAE1, "gopc2": GOPC2}


def build_model(cfg: Config) -> SeqModel:
    return MODELS[cfg.model.kind](cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
