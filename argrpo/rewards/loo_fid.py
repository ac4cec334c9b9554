"""LOO-FID: a per-sample reward from a distribution-level metric (docs/method.md, "LOO-FID").

The metric is the diagonal Fréchet distance between moments (mu, std) and the reference moments:
    FID(mu, std) = ||mu_r - mu||^2 + ||std_r - std||^2.
Sample i is rewarded by how much worse the generated distribution would look without it:
    reward_i = FID(moments without i) - FID(moments with every sample),
positive when i pulls the moments towards the reference. Everything runs in float64.

The batch enters only through the sums S1 = sum f, S2 = sum f^2 and the count N, so a distributed
caller all-reduces `feature_sums` across processes and each process scores its own samples from
their features and the global sums.

Modes:
- `loo_batch`: moments of this step's batch (with and without i).
- `ema_loo` (default): EMA of the raw first and second moments across steps; compares the EMA that
  would result from updating with the full batch against updating with the batch minus i.
- `ema_scalar`: one shared reward, EMA FID before the update minus after it, the same for every
  sample (under per-group advantage normalisation it carries no signal; it exists for ablations).
After the rewards are computed the EMA is updated with the full batch (in every mode, so the EMA FID
is always logged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from argrpo.config import Bool, Float, Int, require
from argrpo.distributed import all_gather_cat, is_distributed
from argrpo.features import FeatureExtractor

LOO_FID_MODES = ("loo_batch", "ema_loo", "ema_scalar")


@dataclass(frozen=True)
class LooFidConfig:
    mode: str = "ema_loo"
    ema_beta: Float = 0.99
    debias: Bool = False  # Adam-style: divide the EMA by the weight its updates have accumulated
    bootstrap: Bool = False  # start the EMA from the base model's generated statistics
    bootstrap_batches: Int = 4  # rollout batches generated for the bootstrap
    # full: the EMA starts at the bootstrap moments with weight 1; one_update: as one ordinary update from an
    # empty EMA (weight 1 - beta), which is what the LOO-FID paper's code does
    bootstrap_weight: str = "full"
    eps: Float = 1e-6  # inside sqrt(var + eps); the paper's code uses 1e-12
    # diagonal: the reward's Frechet distance on per-dimension moments (every published LOO-FID); full: the
    # exact full-covariance FID, leave-one-out computed in the N x N sample space (loo_batch mode only)
    covariance: str = "diagonal"

    def __post_init__(self) -> None:
        require(self.mode in LOO_FID_MODES, "mode", f"must be one of {', '.join(LOO_FID_MODES)}", self.mode)
        require(0 <= self.ema_beta < 1, "ema_beta", "must be in [0, 1)", self.ema_beta)
        require(isinstance(self.debias, bool), "debias", "must be true or false", self.debias)
        require(isinstance(self.bootstrap, bool), "bootstrap", "must be true or false", self.bootstrap)
        require(self.bootstrap_batches >= 1, "bootstrap_batches", "must be >= 1", self.bootstrap_batches)
        require(self.eps > 0, "eps", "must be > 0", self.eps)
        require(self.bootstrap_weight in ("full", "one_update"), "bootstrap_weight", "must be one of full, one_update",
                self.bootstrap_weight)
        require(self.covariance in ("diagonal", "full"), "covariance", "must be one of diagonal, full",
                self.covariance)
        require(self.covariance == "diagonal" or self.mode == "loo_batch", "covariance",
                "full is exact only for mode loo_batch (an EMA of full covariances has no cheap leave-one-out "
                "square root)", self.covariance)


@dataclass(frozen=True)
class FeatureSums:
    s1: torch.Tensor  # [F] float64, sum of features
    s2: torch.Tensor  # [F] float64, sum of squared features
    n: int


@dataclass(frozen=True)
class EmaMoments:
    """EMA of the raw moments E[f] and E[f^2]; `weight` is the total weight the updates have put in
    (0 for a fresh EMA, 1 after a bootstrap), the Adam bias correction 1 - beta^t generalised."""

    m1: torch.Tensor  # [F] float64
    m2: torch.Tensor  # [F] float64
    weight: float


def feature_sums(features: torch.Tensor) -> FeatureSums:
    """S1, S2, N of features [N, F]; sum these across processes before `loo_fid_rewards`."""
    f = features.double()
    return FeatureSums(f.sum(0), f.square().sum(0), f.shape[0])


def diag_fid(mu: torch.Tensor, std: torch.Tensor, ref_mu: torch.Tensor, ref_std: torch.Tensor) -> torch.Tensor:
    """||ref_mu - mu||^2 + ||ref_std - std||^2 over the last dimension."""
    return (ref_mu - mu).square().sum(-1) + (ref_std - std).square().sum(-1)


def moments_std(m1: torch.Tensor, m2: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-dimension std from raw moments; the clamp absorbs rounding, eps keeps sqrt differentiable."""
    return (m2 - m1.square()).clamp_min(0).add(eps).sqrt()


def loo_fid_rewards(
    features: torch.Tensor,
    ref_mu: torch.Tensor,
    ref_std: torch.Tensor,
    *,
    sums: FeatureSums | None = None,
    mode: str = "ema_loo",
    state: EmaMoments | None = None,
    ema_beta: float = 0.99,
    debias: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, EmaMoments, dict[str, float]]:
    """Rewards [n] (float64) for the local `features` [n, F], the EMA updated with the full batch,
    and stats {batch_fid, ema_fid}. `sums` are the batch sums (all processes); default: local ones.
    `state` None is a fresh EMA (zero moments, zero weight)."""
    require(mode in LOO_FID_MODES, "mode", f"must be one of {', '.join(LOO_FID_MODES)}", mode)
    f = features.double()
    ref_mu, ref_std = ref_mu.double().to(f.device), ref_std.double().to(f.device)
    sums = sums if sums is not None else feature_sums(f)
    require(sums.n >= 2, "batch size", "must be >= 2 for leave-one-out moments", sums.n)
    if state is None:
        state = EmaMoments(torch.zeros_like(sums.s1), torch.zeros_like(sums.s1), 0.0)
    n = sums.n
    mu, m2 = sums.s1 / n, sums.s2 / n  # [F]: moments of the full batch
    mu_loo = (sums.s1 - f) / (n - 1)  # [n, F]: moments without sample i, one row per local sample
    m2_loo = (sums.s2 - f.square()) / (n - 1)

    def ema(batch_m1: torch.Tensor, batch_m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = 1.0 - ema_beta
        return (ema_beta * state.m1 + a * batch_m1, ema_beta * state.m2 + a * batch_m2,
                ema_beta * state.weight + a)

    def fid(m1: torch.Tensor, m2: torch.Tensor, weight: float) -> torch.Tensor:
        if debias:
            m1, m2 = m1 / weight, m2 / weight
        return diag_fid(m1, moments_std(m1, m2, eps), ref_mu, ref_std)

    full_m1, full_m2, full_w = ema(mu, m2)
    fid_full = fid(full_m1, full_m2, full_w)
    if mode == "loo_batch":
        rewards = fid(mu_loo, m2_loo, 1.0) - fid(mu, m2, 1.0)
    elif mode == "ema_loo":
        rewards = fid(*ema(mu_loo, m2_loo)) - fid_full
    else:  # ema_scalar; a fresh EMA has no "before" to compare with, so the first reward is 0
        before = fid(state.m1, state.m2, state.weight) - fid_full if state.weight > 0 else fid_full * 0
        rewards = before.expand(f.shape[0]).clone()
    stats = {"batch_fid": float(fid(mu, m2, 1.0)), "ema_fid": float(fid_full)}
    return rewards, EmaMoments(full_m1, full_m2, full_w), stats


def full_loo_fid_rewards(features: torch.Tensor, ref_mu: torch.Tensor,
                         ref_sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact leave-one-out rewards of the full-covariance FID, FID(batch without i) - FID(batch) [N], and
    the batch's FID (docs/method.md, "Exact full-covariance LOO-FID").

    FID(mu, S) = |mu - mu_r|^2 + tr S + tr S_r - 2 tr sqrt(S_r^1/2 S S_r^1/2), S the unbiased covariance.
    With centred rows C of n samples, S = C^T C / (n - 1), and the non-zero eigenvalues of S_r^1/2 S S_r^1/2
    are those of the n x n matrix C S_r C^T / (n - 1). So once K = X S_r X^T (one N x D x D product) and the
    Gram matrix X X^T are known, each leave-one-out FID costs one (N-1) x (N-1) symmetric eigendecomposition,
    batched over i, instead of a D x D matrix square root. Everything runs in float64.
    """
    x = features.double()  # [N, D]
    n = x.shape[0]
    require(n >= 3, "batch size", "must be >= 3 for leave-one-out covariances", n)
    mu_r, sigma_r = ref_mu.double().to(x.device), ref_sigma.double().to(x.device)
    k, gram = x @ sigma_r @ x.T, x @ x.T  # [N, N]
    tr_r = torch.diagonal(sigma_r).sum()

    def fid(rows: torch.Tensor) -> torch.Tensor:
        """FIDs of the sample subsets `rows` [..., m] (index tensors of m rows each) -> [...]."""
        m = rows.shape[-1]
        centre = torch.eye(m, dtype=x.dtype, device=x.device) - 1.0 / m  # [m, m]
        k_sub = centre @ k[rows[..., :, None], rows[..., None, :]] @ centre  # [..., m, m]
        g_sub = gram[rows[..., :, None], rows[..., None, :]]
        trace_s = (torch.diagonal(g_sub, dim1=-2, dim2=-1).sum(-1) - g_sub.sum((-2, -1)) / m) / (m - 1)
        root = torch.linalg.eigvalsh(k_sub / (m - 1)).clamp_min(0).sqrt().sum(-1)
        mean = x[rows].mean(-2)  # [..., D]
        return (mean - mu_r).square().sum(-1) + trace_s + tr_r - 2 * root

    everyone = torch.arange(n, device=x.device)
    others = torch.stack([torch.cat([everyone[:i], everyone[i + 1 :]]) for i in range(n)])  # [N, N-1]
    full = fid(everyone)
    return fid(others) - full, float(full)


def local_offset(n_local: int) -> int:
    """Where this process's rows start in a batch gathered from every process in rank order."""
    if not is_distributed():
        return 0
    sizes = all_gather_cat(torch.tensor([n_local]))
    return int(sizes[: torch.distributed.get_rank()].sum())


class LooFidReward:
    """The LOO-FID reward over an extractor's features (`extractor.features(images) -> [N, F]`).

    Stateful: every call updates the EMA moments (after scoring). The training loop calls
    `features` and `score` separately so that the sums can be all-reduced in between.
    """

    def __init__(self, extractor: FeatureExtractor | None, ref_mu: torch.Tensor, ref_std: torch.Tensor,
                 mode: str = "ema_loo", ema_beta: float = 0.99, debias: bool = False, eps: float = 1e-6,
                 bootstrap_weight: str = "full", covariance: str = "diagonal", ref_sigma: torch.Tensor | None = None):
        LooFidConfig(mode=mode, ema_beta=ema_beta, debias=debias, eps=eps, bootstrap_weight=bootstrap_weight,
                     covariance=covariance)  # the same checks as the config
        require(ref_mu.ndim == 1 and ref_mu.shape == ref_std.shape, "ref_mu/ref_std",
                "must be 1-D of the same length", (tuple(ref_mu.shape), tuple(ref_std.shape)))
        if covariance == "full":
            require(ref_sigma is not None and tuple(ref_sigma.shape) == (ref_mu.shape[0],) * 2, "ref_sigma",
                    "must be the [F, F] reference covariance for covariance full",
                    None if ref_sigma is None else tuple(ref_sigma.shape))
        self.extractor = extractor
        self.ref_mu, self.ref_std = ref_mu.double(), ref_std.double()
        self.ref_sigma = None if ref_sigma is None else ref_sigma.double()
        self.mode, self.ema_beta, self.debias, self.eps = mode, ema_beta, debias, eps
        self.bootstrap_weight, self.covariance = bootstrap_weight, covariance
        self.state: EmaMoments | None = None
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_config(cls, extractor: FeatureExtractor | None, ref_mu: torch.Tensor, ref_std: torch.Tensor,
                    cfg: LooFidConfig, ref_sigma: torch.Tensor | None = None) -> LooFidReward:
        return cls(extractor, ref_mu, ref_std, cfg.mode, cfg.ema_beta, cfg.debias, cfg.eps, cfg.bootstrap_weight,
                   cfg.covariance, ref_sigma)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1] -> features [N, F] float64."""
        with torch.no_grad():
            return self.extractor.features(images).double()

    def score(self, features: torch.Tensor, sums: FeatureSums | None = None,
              batch: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [n] float32 for the local features, then the EMA update with the full batch.

        The diagonal FID needs only the batch sums (`sums`, all processes'); the full-covariance one needs
        every process's features (`batch` [N, F], the local rows among them in rank order).
        """
        if self.covariance == "full":
            everything = features if batch is None else batch
            rewards, fid = full_loo_fid_rewards(everything, self.ref_mu, self.ref_sigma)
            self.last_stats = {"batch_fid": fid}
            start = 0 if batch is None else local_offset(features.shape[0])
            return rewards[start : start + features.shape[0]].float()
        rewards, self.state, self.last_stats = loo_fid_rewards(
            features, self.ref_mu, self.ref_std, sums=sums, mode=self.mode, state=self.state,
            ema_beta=self.ema_beta, debias=self.debias, eps=self.eps,
        )
        return rewards.float()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(images))

    def bootstrap(self, features: torch.Tensor, sums: FeatureSums | None = None) -> None:
        """Start the EMA from the moments of `features` (e.g. the base model's samples): with weight 1, or as
        one ordinary update of an empty EMA (`bootstrap_weight: one_update`, the paper's code)."""
        sums = sums if sums is not None else feature_sums(features)
        m1, m2 = sums.s1 / sums.n, sums.s2 / sums.n
        a = 1.0 if self.bootstrap_weight == "full" else 1.0 - self.ema_beta
        self.state = EmaMoments(a * m1, a * m2, a)

    def state_dict(self) -> dict:
        if self.state is None:
            return {}
        return {"m1": self.state.m1, "m2": self.state.m2, "weight": self.state.weight}

    def load_state_dict(self, state: dict) -> None:
        self.state = EmaMoments(state["m1"].double(), state["m2"].double(), float(state["weight"])) if state else None
