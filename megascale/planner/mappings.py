"""Allocation mappings: a compute budget C (FLOPs) → target model size N and tokens D.

The patent's "allocation mapping, in accordance with a set of allocation
mapping parameters" (US2023315532A1). Three families, each with its published
parameters and each parameter overridable (``with_overrides``):

* ``PowerLawMapping`` — N_opt = G·C^a, D_opt = C / (6·N_opt): Chinchilla
  approaches 1 and 2, Kaplan et al. 2020. Papers publish the exponent ``a``; the
  coefficient G comes from a published *anchor* (C0, N0): G = N0 / C0^a, so
  overriding ``a`` rotates the law around the anchor instead of moving it by
  orders of magnitude.
* ``ParametricMapping`` — L(N, D) = E + A/N^α + B/D^β (Chinchilla approach 3,
  the Epoch AI refit). Minimised under C = 6ND it has a closed form
  (Hoffmann et al. 2022, eq. 4)::

      substitute D = C/(6N):  dL/dN = -αA·N^(-α-1) + βB·(C/6)^(-β)·N^(β-1) = 0
      ⇒ N_opt = G·(C/6)^a,  D_opt = G^(-1)·(C/6)^b,
         G = (αA / (βB))^(1/(α+β)),  a = β/(α+β),  b = α/(α+β).

* ``ModelScaleMapping`` — DeepSeek LLM (Bi et al. 2024): the model scale is
  M = non-embedding FLOPs per token (attention included), M_opt = k_M·C^a,
  D_opt = k_D·C^b with C = M·D.

Every mapping says what its N counts (``param_count``): Chinchilla and Epoch
count *all* parameters, embeddings included; Kaplan counts non-embedding
parameters only; DeepSeek targets M instead of N. The planner's shape solver
hits the quantity the mapping is about.

The published C of all of them is the 6·N·D approximation (Kaplan: 6·N_nonemb·D;
DeepSeek: M·D). The planner turns the allocation into tokens with the FLOPs
model the user picks and says which (see ``megascale.planner.plan``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from megascale.errors import MegascaleError

PARAMS = "params"  # all parameters (applied), embeddings included — Chinchilla's N
NON_EMBEDDING = "non_embedding"  # applied parameters without the embedding and LM head — Kaplan's N
MODEL_SCALE = "model_scale"  # non-embedding FLOPs per token, attention included — DeepSeek's M

TARGET_WORDS = {
    PARAMS: "all parameters, embeddings included (Chinchilla's N)",
    NON_EMBEDDING: "non-embedding parameters (Kaplan's N)",
    MODEL_SCALE: "non-embedding FLOPs/token M (DeepSeek's model scale)",
}


def sci(x: float, digits: int = 3) -> str:
    """1.9137e21 → '1.91e21' (no '+', no leading zeros in the exponent)."""
    text = f"{x:.{digits}g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class Allocation:
    """The allocation tuple for one budget."""

    flops: float
    params: float  # N_opt (for MODEL_SCALE mappings: the rough M/6 equivalent)
    tokens: float  # D_opt
    loss: float | None = None  # predicted loss where the mapping has one (nats/token, the fit's data)
    target: float = 0.0  # the quantity the shape solver must hit (N, non-embedding N or M)
    target_kind: str = PARAMS

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class Mapping:
    """Common part: identity, provenance and (de)serialisation."""

    name: str
    title: str = ""
    source: str = ""
    param_count: str = PARAMS
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # fit statistics, CIs, ...

    kind: ClassVar[str] = ""
    overridable: ClassVar[tuple[str, ...]] = ()

    def allocate(self, flops: float) -> Allocation:
        raise NotImplementedError

    def formula(self) -> str:
        raise NotImplementedError

    def values(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.overridable}

    def with_overrides(self, overrides: dict[str, float]) -> "Mapping":
        """A copy with some parameters replaced; unknown names raise one line."""
        unknown = sorted(set(overrides) - set(self.overridable))
        if unknown:
            raise MegascaleError(
                f"mapping '{self.name}' has no parameter '{unknown[0]}'; its parameters are {', '.join(self.overridable)}"
            )
        for key, value in overrides.items():
            if not (math.isfinite(value) and value > 0):
                raise MegascaleError(f"mapping parameter {key}={value} must be a positive number")
        if not overrides:
            return self
        changed = ", ".join(f"{k}={v:g}" for k, v in overrides.items())
        return dataclasses.replace(self, **overrides, title=f"{self.title} [overridden: {changed}]")

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "name": self.name, "title": self.title, "source": self.source,
               "param_count": self.param_count, **self.values()}
        if self.extra:
            out["extra"] = self.extra
        return out


@dataclass(frozen=True)
class PowerLawMapping(Mapping):
    """N_opt = G·C^a with G = anchor_params / anchor_flops^a; D_opt = C / (6·N_opt)."""

    a: float = 0.5
    anchor_flops: float = 5.76e23
    anchor_params: float = 70e9

    kind: ClassVar[str] = "power_law"
    overridable: ClassVar[tuple[str, ...]] = ("a", "anchor_flops", "anchor_params")

    @property
    def G(self) -> float:  # noqa: N802 (the papers' symbol)
        return self.anchor_params / self.anchor_flops**self.a

    def allocate(self, flops: float) -> Allocation:
        n = self.G * flops**self.a
        return Allocation(flops, n, flops / (6.0 * n), None, n, self.param_count)

    def formula(self) -> str:
        return (f"N_opt = {sci(self.G, 4)}·C^{self.a:.4g} (through N = {sci(self.anchor_params)} at C = {sci(self.anchor_flops)}), "
                f"D_opt = C/(6·N_opt)")


@dataclass(frozen=True)
class ParametricMapping(Mapping):
    """L(N, D) = E + A/N^alpha + B/D^beta, minimised under C = 6ND in closed form."""

    E: float = 1.69  # noqa: N815
    A: float = 406.4  # noqa: N815
    B: float = 410.7  # noqa: N815
    alpha: float = 0.34
    beta: float = 0.28

    kind: ClassVar[str] = "parametric"
    overridable: ClassVar[tuple[str, ...]] = ("E", "A", "B", "alpha", "beta")

    @property
    def a(self) -> float:
        """Exponent of N_opt in C: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt in C: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:  # noqa: N802
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def allocate(self, flops: float) -> Allocation:
        n = self.G * (flops / 6.0) ** self.a
        d = (flops / 6.0) ** self.b / self.G
        return Allocation(flops, n, d, self.loss(n, d), n, self.param_count)

    def formula(self) -> str:
        return (f"L = {self.E:g} + {self.A:g}/N^{self.alpha:g} + {self.B:g}/D^{self.beta:g}; "
                f"N_opt = {self.G:.4g}·(C/6)^{self.a:.4f}, D_opt = (C/6)^{self.b:.4f}/{self.G:.4g}")


@dataclass(frozen=True)
class ModelScaleMapping(Mapping):
    """M_opt = k_m·C^a (non-embedding FLOPs/token), D_opt = k_d·C^b (DeepSeek LLM)."""

    k_m: float = 0.1715
    a: float = 0.5243
    k_d: float = 5.8316
    b: float = 0.4757

    kind: ClassVar[str] = "model_scale"
    overridable: ClassVar[tuple[str, ...]] = ("k_m", "a", "k_d", "b")

    def allocate(self, flops: float) -> Allocation:
        m = self.k_m * flops**self.a
        d = self.k_d * flops**self.b
        return Allocation(flops, m / 6.0, d, None, m, MODEL_SCALE)

    def formula(self) -> str:
        return f"M_opt = {self.k_m:g}·C^{self.a:g} (non-embedding FLOPs/token), D_opt = {self.k_d:g}·C^{self.b:g}"


# ------------------------------------------------------------------ published

GOPHER_FLOPS = 5.76e23  # Hoffmann et al. 2022: Gopher's (and Chinchilla's) training budget
PF_DAY = 1e15 * 24 * 3600  # Kaplan et al. 2020: one petaflop/s-day in FLOPs

PUBLISHED: dict[str, Mapping] = {
    m.name: m
    for m in (
        PowerLawMapping(
            "chinchilla-1", "Chinchilla approach 1 (training-curve envelope)",
            "Hoffmann et al. 2022, Table 2: a = 0.50; G from Table 3: 67B parameters at 5.76e23 FLOPs (1.5T tokens)",
            a=0.50, anchor_flops=GOPHER_FLOPS, anchor_params=67e9,
        ),
        PowerLawMapping(
            "chinchilla-2", "Chinchilla approach 2 (IsoFLOP profiles)",
            "Hoffmann et al. 2022, Table 2: a = 0.49; G from the Chinchilla anchor: 70B parameters at Gopher's 5.76e23 FLOPs (1.4T tokens)",
            a=0.49, anchor_flops=GOPHER_FLOPS, anchor_params=70e9,
        ),
        ParametricMapping(
            "chinchilla-3", "Chinchilla approach 3 (parametric loss, as printed)",
            "Hoffmann et al. 2022, eq. 10: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28 (a = beta/(alpha+beta) = 0.45; the paper quotes 0.46 from unrounded values)",
            E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
        ),
        ParametricMapping(
            "chinchilla-3-tex", "Chinchilla approach 3 (unrounded values of the paper's TeX source)",
            "Hoffmann et al. 2022 TeX source, as reported by Besiroglu et al. 2024: E = 1.6934, alpha = 0.3392, beta = 0.2849 (A, B as printed); a = 0.4565",
            E=1.6934, A=406.4, B=410.7, alpha=0.3392, beta=0.2849,
        ),
        ParametricMapping(
            "epoch", "Epoch AI refit of Chinchilla approach 3",
            "Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt' (arXiv:2404.10102): E = 1.8172, A = 482.01, B = 2085.43, alpha = 0.3478, beta = 0.3658 (a = 0.5126)",
            E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
        ),
        PowerLawMapping(
            "kaplan", "Kaplan et al. 2020 (for contrast: grows N much faster than D)",
            "Kaplan et al. 2020, eq. 1.7 and Table 6: N_opt = 1.3e9·(C_min / 1 PF-day)^0.73 non-embedding parameters; here C_min := C",
            param_count=NON_EMBEDDING, a=0.73, anchor_flops=PF_DAY, anchor_params=1.3e9,
        ),
        ModelScaleMapping(
            "deepseek", "DeepSeek LLM (model scale = non-embedding FLOPs/token)",
            "Bi et al. 2024, 'DeepSeek LLM' (arXiv:2401.02954), eq. 4: M_opt = 0.1715·C^0.5243, D_opt = 5.8316·C^0.4757 (their OpenWebText2-like mix)",
            param_count=MODEL_SCALE, k_m=0.1715, a=0.5243, k_d=5.8316, b=0.4757,
        ),
    )
}
DEFAULT_MAPPING = "epoch"

_KINDS = {cls.kind: cls for cls in (PowerLawMapping, ParametricMapping, ModelScaleMapping)}


def mapping_from_dict(data: dict[str, Any], where: str = "mapping") -> Mapping:
    """Rebuild a mapping written by ``to_dict`` (e.g. the fit's mapping.json)."""
    cls = _KINDS.get(data.get("kind", ""))
    if cls is None:
        raise MegascaleError(f"{where}: 'kind' must be one of {', '.join(_KINDS)}; write it with `launch/plan.py fit`")
    try:
        values = {k: float(data[k]) for k in cls.overridable}
    except (KeyError, TypeError, ValueError):
        raise MegascaleError(f"{where}: a {cls.kind} mapping needs numeric {', '.join(cls.overridable)}") from None
    meta = {k: str(data.get(k, "")) for k in ("title", "source")}
    param_count = data.get("param_count", PARAMS)
    if param_count not in TARGET_WORDS:
        raise MegascaleError(f"{where}: param_count '{param_count}' is not one of {', '.join(TARGET_WORDS)}")
    return cls(str(data.get("name", "fitted")), **meta, param_count=param_count, extra=data.get("extra", {}), **values)


def get_mapping(spec: str, overrides: dict[str, float] | None = None) -> Mapping:
    """A published mapping by name, or a JSON file written by ``launch/plan.py fit``."""
    spec = str(spec).strip()
    if spec.lower() in PUBLISHED:
        mapping = PUBLISHED[spec.lower()]
    elif spec.endswith(".json") or Path(spec).is_file():
        mapping = load_mapping(Path(spec))
    else:
        raise MegascaleError(
            f"unknown mapping '{spec}'; use one of {', '.join(PUBLISHED)} or a mapping.json written by `launch/plan.py fit`"
        )
    return mapping.with_overrides(overrides or {})


def load_mapping(path: Path) -> Mapping:
    if not path.is_file():
        raise MegascaleError(f"mapping file '{path}' not found; write one with `launch/plan.py fit RUN_DIR... --out DIR`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MegascaleError(f"mapping file '{path}' is not valid JSON; rewrite it with `launch/plan.py fit`") from None
    if not isinstance(data, dict):
        raise MegascaleError(f"mapping file '{path}' must hold one JSON object")
    return mapping_from_dict(data, where=str(path))


def save_mapping(mapping: Mapping, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mapping.to_dict(), indent=2) + "\n")
    return path


def parse_overrides(items: list[str]) -> dict[str, float]:
    """``['alpha=0.35', 'a=0.5']`` → {'alpha': 0.35, 'a': 0.5}."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(raw)
        except ValueError:
            raise MegascaleError(f"--set '{item}' is not of the form name=number (e.g. --set alpha=0.35)") from None
    return out
