"""A GPT-2 style decoder-only transformer: configuration, parameters, forward and backward.

Shape letters: B batch, T time (sequence), C channels (hidden_size), V vocabulary, NH heads,
HS head size (C // NH), L layers.

Parameters are a flat dict keyed by Hugging Face GPT-2 names, linear weights in GPT-2's Conv1D
orientation [in, out], so a GPT-2 state dict maps 1:1 onto ours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .backend import resolve_dtype
from .validation import check_choice, check_positive_int

POSITIONAL = ("learned", "sinusoidal")
LAYERNORM_EPS = 1e-5


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of the model. Validated on construction."""

    vocab_size: int = 32000
    max_seq_len: int = 2048
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    dropout: float = 0.1
    dtype: str = "float32"
    positional: str = "learned"
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads"):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got hidden_size={self.hidden_size} "
                f"and num_heads={self.num_heads}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_choice("dtype", self.dtype, ("float32", "float64"))
        check_choice("positional", self.positional, POSITIONAL)
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def np_dtype(self):
        return resolve_dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        return cls(**d)


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the order of the forward pass)."""
    V, C, L = config.vocab_size, config.hidden_size, config.num_layers
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C)}
    if config.positional == "learned":
        shapes["wpe.weight"] = (config.max_seq_len, C)
    for i in range(L):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.weight"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (C, 4 * C)
        shapes[p + "mlp.c_fc.bias"] = (4 * C,)
        shapes[p + "mlp.c_proj.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)  # nn.Linear orientation, as in Hugging Face GPT2LMHeadModel
    return shapes


def check_params(params, config: GPTConfig, name: str = "params") -> None:
    """Raise ValueError naming every missing, extra or mis-shaped key of a params dict."""
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}")
    expected = param_shapes(config)
    missing = [k for k in expected if k not in params]
    extra = [k for k in params if k not in expected]
    wrong = [
        f"{k}: expected {expected[k]}, got {tuple(getattr(params[k], 'shape', ()))}"
        for k in expected
        if k in params and tuple(getattr(params[k], "shape", ())) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"{name} do not match the config: " + ". ".join(problems))
