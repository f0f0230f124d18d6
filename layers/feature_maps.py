"""Feature maps for kernelised (linear) attention: phi such that phi(q) . phi(k) stands in for
the softmax kernel exp(q . k / sqrt(D)), so attention becomes phi(Q) (phi(K)^T V).

Every map takes per-head vectors (B, T, H, D) and a role ("query" or "key") and returns features
(B, T, H, F). The role matters only for maps that treat queries and keys differently (Hedgehog
learns one map for each); FAVOR+ shares one random projection between them, which is why one
module serves both roles. Every map acts on each token on its own, so linear attention built on
it keeps the state contract's chunk and step consistency.

Names (`FEATURE_MAPS`): "elu+1" (Katharopoulos et al. 2020), "relu", "identity", "favor+"
(Performer, Choromanski et al. 2021) and "hedgehog" (Zhang et al. 2024).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROLES = ("query", "key")


class FeatureMap(nn.Module):
    """Base: (B, T, H, D) -> (B, T, H, feature_dim). `kernel_scale` is the factor linear
    attention should apply to q . k when it uses this map (1 where the map already includes
    the softmax temperature 1 / sqrt(D))."""

    def __init__(self, head_dim: int, feature_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.feature_dim = feature_dim

    @property
    def kernel_scale(self) -> float:
        return self.feature_dim ** -0.5

    def forward(self, x: torch.Tensor, role: str = "query") -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"{type(self).__name__}: role={role!r} is not one of {ROLES}")
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{type(self).__name__}: x must be (B, T, H, head_dim={self.head_dim}), "
                f"got {tuple(x.shape)}"
            )


class IdentityFeatureMap(FeatureMap):
    """phi(x) = x: plain (unnormalised) linear attention, the kernel q . k itself."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, head_dim)

    def forward(self, x, role="query"):
        self._check(x, role)
        return x


class EluPlusOneFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, eq. 7): positive, so the
    normalised form's denominator phi(q) . sum phi(k) never vanishes."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, head_dim)

    def forward(self, x, role="query"):
        self._check(x, role)
        return F.elu(x) + 1.0


class ReluFeatureMap(FeatureMap):
    """phi(x) = relu(x): non-negative, sparse (as in cosFormer's and TransNormer's choice)."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, head_dim)

    def forward(self, x, role="query"):
        self._check(x, role)
        return F.relu(x)


def orthogonal_gaussian_projection(
    n_features: int, head_dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n_features, head_dim) rows that are orthogonal within blocks of head_dim rows, each row
    with the norm of a D-dimensional standard Gaussian vector (Performer, section 4: each row is
    then marginally N(0, I), which keeps the softmax-kernel estimate unbiased)."""
    blocks = []
    for start in range(0, n_features, head_dim):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # sign fix makes q Haar-distributed rather than biased by the QR convention
        q = q * torch.sign(torch.diagonal(r))[None, :]
        blocks.append(q.T[: min(head_dim, n_features - start)])
    directions = torch.cat(blocks, dim=0)
    norms = torch.randn(n_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * norms[:, None]).float()


class FavorPlusFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features (Performer, Choromanski et al. 2021, eq. 7 and
    lemma 1): with x' = x / D^(1/4) and rows w_r of an orthogonal Gaussian projection W,

        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),  E_W[phi(q) . phi(k)] = exp(q . k / sqrt(D)),

    the softmax kernel. The projection is a persistent buffer (shared by queries and keys, saved
    with the model); `redraw_features()` draws a new one, and only when called: redrawing inside
    forward would make a split sequence see two different kernels.

    No data-dependent stabiliser is subtracted (Performer subtracts a max over all keys, which
    would tie each token's features to the rest of the sequence and break chunk consistency).
    The exponent is bounded all the same: w . x' - |x'|^2 / 2 <= |w|^2 / 2 (about D / 2).
    """

    def __init__(self, head_dim: int, feature_dim: int | None = None, seed: int | None = None):
        # Performer's default m = D log D features
        feature_dim = feature_dim or max(1, round(head_dim * math.log(max(head_dim, 2))))
        super().__init__(head_dim, feature_dim)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        projection = orthogonal_gaussian_projection(feature_dim, head_dim, generator)
        self.register_buffer("projection", projection)

    @property
    def kernel_scale(self) -> float:
        return 1.0  # the 1 / sqrt(D) temperature is inside the features

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh projection in place (Performer redraws periodically during training)."""
        fresh = orthogonal_gaussian_projection(self.feature_dim, self.head_dim, generator)
        self.projection.copy_(fresh.to(self.projection.device, self.projection.dtype))

    def forward(self, x, role="query"):
        self._check(x, role)
        dtype = x.dtype
        x = x.float() * self.head_dim ** -0.25
        logits = torch.einsum("bthd,md->bthm", x, self.projection.float())
        logits = logits - 0.5 * x.square().sum(-1, keepdim=True)
        return (torch.exp(logits) * self.feature_dim ** -0.5).to(dtype)


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine"): a learned per-head linear
    map W_h, then phi(x) = softmax([x W_h + b_h, -(x W_h + b_h)]) over the 2D features.

    The paper's map is [exp(x W), exp(-x W)]; taking the softmax divides it by a per-token
    constant, which keeps exp from overflowing and leaves normalised attention unchanged for
    queries. Queries and keys get separate maps (n_heads and n_kv_heads of them). W starts at the
    identity and b at zero, so the map starts as the fixed kernel exp(+-x) that the paper's
    distillation (linearising pretrained attention) then trains to mimic softmax.
    """

    def __init__(self, head_dim: int, n_heads: int, n_kv_heads: int | None = None):
        super().__init__(head_dim, 2 * head_dim)
        n_kv_heads = n_kv_heads or n_heads
        eye = torch.eye(head_dim)
        self.query_weight = nn.Parameter(eye.repeat(n_heads, 1, 1))
        self.query_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.key_weight = nn.Parameter(eye.repeat(n_kv_heads, 1, 1))
        self.key_bias = nn.Parameter(torch.zeros(n_kv_heads, head_dim))

    @property
    def kernel_scale(self) -> float:
        return 1.0  # softmax features are already bounded; scale would only change nothing

    def forward(self, x, role="query"):
        self._check(x, role)
        weight, bias = (
            (self.query_weight, self.query_bias) if role == "query"
            else (self.key_weight, self.key_bias)
        )
        if x.shape[2] != weight.shape[0]:
            raise ValueError(
                f"HedgehogFeatureMap: {role} has {x.shape[2]} heads, the map was built for "
                f"{weight.shape[0]}"
            )
        projected = torch.einsum("bthd,hde->bthe", x, weight) + bias
        return torch.softmax(torch.cat([projected, -projected], dim=-1), dim=-1)


FEATURE_MAPS = ("elu+1", "relu", "identity", "favor+", "hedgehog")


def build_feature_map(
    name: str,
    head_dim: int,
    n_heads: int = 1,
    n_kv_heads: int | None = None,
    *,
    feature_dim: int | None = None,
) -> FeatureMap:
    """The feature map called `name` for heads of size head_dim. `feature_dim` applies to
    favor+ (number of random features, default D log D); the others fix their own size."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map={name!r} is not one of {FEATURE_MAPS}")
    if feature_dim is not None and name != "favor+":
        raise ValueError(
            f"feature_dim={feature_dim} applies to feature_map='favor+' only; {name!r} "
            f"has {2 * head_dim if name == 'hedgehog' else head_dim} features"
        )
    if name == "elu+1":
        return EluPlusOneFeatureMap(head_dim)
    if name == "relu":
        return ReluFeatureMap(head_dim)
    if name == "identity":
        return IdentityFeatureMap(head_dim)
    if name == "favor+":
        return FavorPlusFeatureMap(head_dim, feature_dim)
    return HedgehogFeatureMap(head_dim, n_heads, n_kv_heads)
