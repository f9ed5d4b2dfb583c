"""The architecture choice: `build` (the seed API), the `Model` protocol every architecture follows,
and the dispatch from a config to its model, its parameter shapes and its checks.

Two architectures: "gpt2" (kto_np.model.GPT, the default) and "edifice" (kto_np.edifice.Edifice, the
network of the seed library's build/1). Everything else in the package takes a `Model` and never asks
which one it has.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .edifice import Edifice, EdificeConfig, build_edifice
from .edifice import param_shapes as edifice_param_shapes
from .model import GPT, GPTConfig
from .model import param_shapes as gpt_param_shapes
from .validation import check_bool, check_choice, check_param_shapes

__all__ = ["ARCHITECTURES", "Model", "build", "check_params", "config_from_dict", "model_from_config",
           "param_shapes"]

ARCHITECTURES = ("gpt2", "edifice")  # build(architecture=...): model.GPT or edifice.Edifice


@runtime_checkable
class Model(Protocol):
    """What a model is to the rest of the package: a frozen config plus pure functions of a params dict.

    forward and backward check their arguments (the public door) unless check=False, which the
    training step passes after checking once at its own door.
    """

    config: Any
    fast: bool  # True: the forward and backward run on kto_np.fast's ops

    def init(self, seed: int) -> dict: ...

    def check_params(self, params, name: str = "params") -> None: ...

    def check_tokens(self, tokens, name: str = "tokens"): ...

    def forward(self, params: dict, tokens, *, train: bool = False, rng=None, keep_cache: bool = True,
                check: bool = True): ...

    def backward(self, dlogits, cache, *, check: bool = True) -> dict: ...


def build(hidden_size: int = 512, num_layers: int = 6, num_heads: int = 8, vocab_size: int = 32000,
          dropout: float = 0.1, max_seq_len: int = 2048, *, dtype: str = "float32",
          positional: str | None = None, tie_embeddings: bool | None = None, architecture: str = "gpt2",
          token_embedding: str | None = None, fast: bool = False) -> GPT | Edifice:
    """The model of the seed API (Edifice.Meta.KTO.build). The config is validated here.

    architecture="gpt2" (default): a GPT-2 style model, positional "learned" (default) or "sinusoidal",
    tie_embeddings True (default) or False. architecture="edifice": Edifice's own backbone
    (kto_np.edifice), token_embedding "fixed" (default, Edifice's) or "learned"; positional and
    tie_embeddings do not apply to it and are rejected, as is token_embedding with "gpt2".
    fast=True runs the model on the fast room's ops (kto_np.fast): the same numbers, faster.
    """
    check_choice("architecture", architecture, ARCHITECTURES)
    fast = check_bool("fast", fast)
    if architecture == "edifice":
        not_applicable = [f"{name}={value!r}" for name, value in
                          (("positional", positional), ("tie_embeddings", tie_embeddings)) if value is not None]
        if not_applicable:
            raise ValueError(
                f"{', '.join(not_applicable)} do not apply to architecture='edifice' (its positions are a "
                "fixed [sin | cos] table and its lm_head is a separate dense layer); leave them unset")
        return build_edifice(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                             vocab_size=vocab_size, dropout=dropout, max_seq_len=max_seq_len, dtype=dtype,
                             token_embedding="fixed" if token_embedding is None else token_embedding, fast=fast)
    if token_embedding is not None:
        raise ValueError(f"token_embedding={token_embedding!r} applies only to architecture='edifice' "
                         "(GPT-2's token embedding is always learned)")
    positional = "learned" if positional is None else positional
    tie_embeddings = True if tie_embeddings is None else tie_embeddings
    config = GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, hidden_size=hidden_size,
                       num_layers=num_layers, num_heads=num_heads, dropout=dropout, dtype=dtype,
                       positional=positional, tie_embeddings=tie_embeddings)
    return GPT(config, fast=fast)


def config_from_dict(d: dict) -> GPTConfig | EdificeConfig:
    """A config from its to_dict(): EdificeConfig when d["architecture"] == "edifice", else GPTConfig."""
    if not isinstance(d, dict):
        raise TypeError(f"config must be a dict, got {type(d).__name__}")
    if d.get("architecture", "gpt2") == "edifice":
        return EdificeConfig.from_dict(d)
    check_choice("architecture", d.get("architecture", "gpt2"), ARCHITECTURES)
    return GPTConfig.from_dict({k: v for k, v in d.items() if k != "architecture"})


def model_from_config(config: GPTConfig | EdificeConfig, *, fast: bool = False) -> GPT | Edifice:
    """The model object of a config: GPT(config) or Edifice(config), on the fast room's ops if fast."""
    return Edifice(config, fast=fast) if isinstance(config, EdificeConfig) else GPT(config, fast=fast)


def param_shapes(config: GPTConfig | EdificeConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape for either architecture's config, in the forward's order."""
    return edifice_param_shapes(config) if isinstance(config, EdificeConfig) else gpt_param_shapes(config)


def check_params(params, config: GPTConfig | EdificeConfig, name: str = "params") -> None:
    """Raise ValueError naming every missing, extra or mis-shaped key of a params dict."""
    check_param_shapes(params, param_shapes(config), name)
