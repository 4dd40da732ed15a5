"""Every neural-collapse measurement of Papyan 2020, Zhu 2021 and Markou 2024, computed fast.

Notation (REFERENCE.md section 1): features h_i (p-dim) with labels y_i in [0, C); class means
mu_c; global mean mu_G (by default the mean of the class means, as Papyan's code; equal to the
sample mean for balanced data); centred means Mdot = [mu_c - mu_G] (stored as C x p rows);
classifier W (C x p) with bias b;
    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
    Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T          (rank <= C-1).

How it is computed
------------------
* Class sums, counts and every other running sum are kept in float64.
* Sigma_B^+ is never formed in p x p. With the thin SVD Mdot = Uc S Vh (rank r = C-1),
  Sigma_B^+ = C Vh_r^T S_r^-2 Vh_r, so

      Tr(Sigma_W Sigma_B^+)/C = (1/N) sum_i || S_r^-1 Vh_r (h_i - mu_{y_i}) ||^2.

  In memory (:func:`measure_collapse`) this needs one product of the centred features with
  [Mdot; W]^T (N x 2C), shared with the NCC, the logits and the cosine margins: one pass over the
  features plus O(p C^2) work, never a p x p matrix.
* Streaming (:class:`CollapseAccumulator`) sees each batch once and cannot know the final means,
  so it accumulates the pooled within-class scatter (p x p, float64) around a per-class shift (the
  first sample of the class it sees), which avoids the catastrophic cancellation
  of E[hh^T] - mu mu^T at collapse, and projects it on the (C-1)-dim subspace at the end.
  Per-sample measurements that need the final means (NCC mismatch, cosine margins) come from a
  second pass, :meth:`CollapseAccumulator.sample_pass`, on any set (train or test).

Products of features are taken in the features' dtype (float32 features: float32 matrix products,
float64 sums); pass float64 features for float64 throughout. Half-precision features are taken as float32.

Numeric range
-------------
Under h -> a h (a > 0) every measurement is unchanged except NC4: NC1 (Sigma_W and Sigma_B both scale
by a^2), equinorm, equiangularity, maximal angle, self-duality, Zhu's NC2 and NC3, WH-equinorm, the ETF
distances, the NCC accuracy and the cosine margins are invariant; accuracy and NCC mismatch are invariant
when b scales with h (argmax(W h + b) = argmax(W h/a + b/a)), and under W, b -> t W, t b; NC4 =
||W mu_G + b|| is computed in float64 from the float64 means. So the float32 products are taken on
h/s (and W/t, b/(s t)) with s, t powers of two that bring the centred class means (streaming: the
first samples) and W to magnitude ~1 whenever these lie outside [2^-20, 2^20]. Dividing by a power of
two is exact: in range the numbers are, bit for bit, those of plain arithmetic, and features of
magnitude 1e19 or 1e-25 give the numbers of the same features at magnitude 1 instead of overflowing
or underflowing float32. What still cannot be represented (float32 features some 1e17 times larger
than the spread of the class means, or, streaming, than the first samples) raises a ValueError; so do
features whose class means all coincide (all features zero or identical): there is no between-class
spread to measure.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from . import etf
from .validation import check_choice, check_int

MEAN_CONVENTIONS = ("class_means", "samples")
CHUNK = 8192
MEAN_CHUNK = 1024
#: Centred means (and W) of magnitude within [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] are measured unscaled.
SAFE_EXPONENT = 20

#: Each paper's label for a measurement -> the key of the result dict.
PAPER_NAMES: dict[str, dict[str, str]] = {
    "papyan2020": {
        "Equinorm (means)": "equinorm_means",
        "Equinorm (classifiers)": "equinorm_classifiers",
        "Equiangularity (means)": "equiangularity_means",
        "Equiangularity (classifiers)": "equiangularity_classifiers",
        "Maximal angle (means)": "max_angle_means",
        "Maximal angle (classifiers)": "max_angle_classifiers",
        "Self-duality": "self_duality",
        "Tr(Sigma_W Sigma_B^+)/C": "within_class_variability",
        "NCC mismatch": "ncc_mismatch_test",
    },
    "zhu2021": {
        "NC1": "within_class_variability",
        "NC2": "classifier_etf_distance",
        "NC2 (means)": "means_etf_distance",
        "NC3": "classifier_means_alignment",
        "NC4": "bias_offset_norm",
    },
    "markou2024": {
        "NC1": "within_class_variability",
        "ETF distance (W)": "classifier_nearest_etf_distance",
        "ETF distance (H)": "means_nearest_etf_distance",
        "ETF distance (W-ETF to H-ETF)": "classifier_means_etf_distance",
        "NC3": "classifier_means_alignment",
        "Average cosine margin": "average_cosine_margin",
        "WH-equinorm": "wh_equinorm",
    },
}


# --------------------------------------------------------------------------- input checks
def _check_features(features: Tensor, name: str = "features") -> Tensor:
    """``features`` as a 2-D float32 or float64 tensor (numpy arrays accepted, half precision widened)."""
    if not isinstance(features, Tensor):
        features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N x p) tensor; got shape {tuple(features.shape)}.")
    if not features.is_floating_point() or features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return features.detach()


def _raise_if_not_finite(features: Tensor, name: str = "features") -> None:
    """The NaN/Inf check, done on results (sums, products) that any NaN or Inf would reach: a
    separate isfinite pass over N x p costs more than the measurements themselves."""
    bad = int((~torch.isfinite(features)).any(1).sum())
    if bad:
        raise ValueError(f"{name} contain NaN or Inf values (in {bad} of {features.shape[0]} rows).")


def _power_of_two_scale(magnitude: float) -> float:
    """1.0 for a magnitude within [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] (or zero), else the power of two just above it.

    Dividing by it is exact (see "Numeric range" in the module doc). The exponent is kept within +-120 so that
    1/s stays finite in float32: that still maps every float32 magnitude, subnormals included, into range."""
    if not (magnitude > 0 and math.isfinite(magnitude)) or 2.0 ** -SAFE_EXPONENT <= magnitude <= 2.0 ** SAFE_EXPONENT:
        return 1.0
    return math.ldexp(1.0, min(max(math.frexp(magnitude)[1], -120), 120))


def _range_error(features: Tensor, reference: float, what: str = "class means") -> ValueError:
    """The error for finite features whose products overflow their dtype even after rescaling."""
    top = float(features.abs().max())
    advice = ("pass them as float64 (features.double())" if features.dtype != torch.float64
              else "rescale them")
    return ValueError(
        f"features span too wide a range for {features.dtype} arithmetic: magnitudes up to {top:.3g} against "
        f"{what} of magnitude {reference:.3g}, so their products overflow; {advice}.")


class NoBetweenClassSpreadError(ValueError):
    """The class means coincide (e.g. all features zero, as at the UFM's origin): collapse is undefined."""


def _check_centred_means(means: Tensor, mu_G: Tensor) -> float:
    """Raise if the class means coincide (no between-class spread: all features zero or identical?) or lie
    beyond what float64 can square; return max |mu_c - mu_G|."""
    if bool((means == means[:1]).all()):
        raise NoBetweenClassSpreadError(
            "all class means are equal (are all features zero or identical?): there is no between-class "
            "spread to measure collapse against; check the features and the labels.")
    m = float((means - mu_G).abs().max())
    if not 2.0 ** -480 < m < 2.0 ** 480:
        raise ValueError(f"the centred class means have magnitude {m:.3g}, beyond what float64 can square; "
                         "rescale the features.")
    return m


def _check_labels(labels: Tensor, n: int, num_classes: int, name: str = "labels") -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of length {n} (one per feature row); got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices; got dtype {labels.dtype}.")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"{name} must lie in [0, num_classes={num_classes}); found values in [{lo}, {hi}].")
    return labels


def _check_classifier(W: Tensor | None, b: Tensor | None, num_classes: int, p: int) -> tuple[Tensor | None, Tensor | None]:
    if W is None:
        if b is not None:
            raise ValueError("b was given without W; pass the classifier weight W (C x p) too.")
        return None, None
    W = torch.as_tensor(W).detach()
    if W.ndim != 2 or W.shape != (num_classes, p):
        raise ValueError(
            f"W must have shape (num_classes, feature_dim) = ({num_classes}, {p}) to match the features; "
            f"got {tuple(W.shape)}."
        )
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or Inf values.")
    if b is not None:
        b = torch.as_tensor(b).detach()
        if b.shape != (num_classes,):
            raise ValueError(f"b must have shape ({num_classes},) to match W; got {tuple(b.shape)}.")
        if not bool(torch.isfinite(b).all()):
            raise ValueError("b contains NaN or Inf values.")
    return W.to(torch.float64), None if b is None else b.to(torch.float64)


def _check_counts(counts: Tensor) -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = empty[:10] + (["..."] if len(empty) > 10 else [])
        raise ValueError(
            f"class(es) {shown} have no samples; every class needs at least one sample to have a mean "
            f"(check labels or num_classes={counts.numel()})."
        )


# --------------------------------------------------------------------------- geometry of means and classifiers
def global_mean(means: Tensor, counts: Tensor, convention: str = "class_means") -> Tensor:
    """mu_G: the mean of the class means (Papyan's code; ``class_means``) or of all samples (``samples``)."""
    check_choice("global_mean", convention, MEAN_CONVENTIONS)
    if convention == "class_means":
        return means.mean(0)
    w = counts.to(means.dtype)
    return (w[:, None] * means).sum(0) / w.sum()


def self_duality(W: Tensor, centred_means: Tensor) -> float:
    """|| W/||W||_F - Mdot/||Mdot||_F ||_F^2 (Papyan 2020, Fig. 5), rows of both; in [0, 4]."""
    return float((W / W.norm() - centred_means / centred_means.norm()).pow(2).sum())


def classifier_means_alignment(W: Tensor, centred_means: Tensor, *, product: Tensor | None = None) -> float:
    """Zhu 2021's NC3: || W Mdot^T/||W Mdot^T||_F - (I - 11^T/C)/sqrt(C-1) ||_F (``product``: W Mdot^T if known)."""
    A = W @ centred_means.T if product is None else product
    return float((A / A.norm() - etf.etf_gram(W.shape[0], dtype=A.dtype).to(A.device)).norm())


def nearest_etf_distances(W: Tensor, centred_means: Tensor, squared: bool = False) -> dict[str, float]:
    """Markou 2024's ETF distances: of W/||W||_F and of Mdot/||Mdot||_F to their nearest simplex ETF, and
    between those two ETFs (Procrustes with delta = 0 in :mod:`nc_lib.nearest_etf`; needs d >= C).
    The authors' code reports squared distances (``squared=True``)."""
    from .nearest_etf import etf_distance_between, nearest_etf_distance

    return {
        "classifier_nearest_etf_distance": nearest_etf_distance(W, squared),
        "means_nearest_etf_distance": nearest_etf_distance(centred_means, squared),
        "classifier_means_etf_distance": etf_distance_between(W, centred_means, squared),
    }


def centred_means_gram(means: Tensor, mu_G: Tensor) -> Tensor:
    """G = Mdot Mdot^T (C x C, float64), the Gram that the geometry, the pseudo-inverse and the NC1 offsets share."""
    Mdot = (means - mu_G).to(torch.float64)
    return Mdot @ Mdot.T


def geometry(means: Tensor, mu_G: Tensor, W: Tensor | None = None, b: Tensor | None = None, *,
             means_gram: Tensor | None = None) -> dict[str, float]:
    """Measurements that depend only on the class means and the classifier (no per-sample pass).

    equinorm (Papyan Fig. 2), equiangularity (Fig. 3), maximal angle (Fig. 4), self-duality
    (Fig. 5), Zhu's NC2 (W and centred means), NC3 and NC4 = ||W mu_G + b||, and Markou's
    WH-equinorm = |equinorm(Mdot) - equinorm(W)|. Each comes from one of three C x C products,
    Mdot Mdot^T (``means_gram`` if already computed), W W^T and W Mdot^T.
    """
    Mdot = (means - mu_G).to(torch.float64)
    m = etf.gram_measurements(Mdot @ Mdot.T if means_gram is None else means_gram)
    out = {"equinorm_means": m["equinorm"], "equiangularity_means": m["equiangularity"],
           "max_angle_means": m["max_angle"], "means_etf_distance": m["etf_distance"]}
    if W is not None:
        W = W.to(Mdot)
        w = etf.gram_measurements(W @ W.T)
        out.update({
            "equinorm_classifiers": w["equinorm"],
            "equiangularity_classifiers": w["equiangularity"],
            "max_angle_classifiers": w["max_angle"],
            "classifier_etf_distance": w["etf_distance"],
            "self_duality": self_duality(W, Mdot),
            "classifier_means_alignment": classifier_means_alignment(W, Mdot, product=W @ Mdot.T),
            "bias_offset_norm": float((W @ mu_G.to(Mdot) + (0 if b is None else b.to(Mdot))).norm()),
            "wh_equinorm": abs(m["equinorm"] - w["equinorm"]),
        })
    return out


def between_class_gram_pinv(centred_means: Tensor, gram: Tensor | None = None) -> Tensor:
    """G^+ for the C x C Gram G = Mdot Mdot^T of the centred means (rank C-1).

    Tr(Sigma_W Sigma_B^+)/C = (1/N) sum_i ||G^+ Mdot (h_i - mu_{y_i})||^2, because with the thin SVD
    Mdot = Uc S Vh we have Vh^T S^-2 Vh = Mdot^T (G^+)^2 Mdot. G's null vector q is known (the
    centred means sum to zero: q = 1/sqrt(C) for the mean-of-class-means convention), so
    G^+ = (G + a q q^T)^-1 - q q^T/a with a = tr(G)/C, one Cholesky of a C x C matrix. If the
    means span fewer than C-1 dimensions (d < C-1, or degenerate means) it falls back to the
    eigendecomposition of G with the numerical rank."""
    G = centred_means @ centred_means.T if gram is None else gram
    C = G.shape[0]
    row_sum = centred_means.sum(0).norm()
    if row_sum <= 1e-10 * centred_means.norm() + 1e-300:
        q = torch.full((C, 1), C ** -0.5, dtype=G.dtype, device=G.device)
        a = torch.diagonal(G).sum() / C
        L, info = torch.linalg.cholesky_ex(G + a * (q @ q.T))
        if int(info) == 0:
            K = torch.cholesky_inverse(L)
            # reject a numerically singular factor (degenerate means): fall back to the eigendecomposition
            if bool(torch.isfinite(K).all()) and float(torch.diagonal(L).min() ** 2) > float(torch.diagonal(L).max() ** 2) * C * 1e-13:
                return K - (q @ q.T) / a
    evals, evecs = torch.linalg.eigh(G)
    tol = evals.max().clamp_min(0) * max(centred_means.shape) * torch.finfo(evals.dtype).eps * 10
    keep = evals > tol
    U = evecs[:, keep]
    return (U / evals[keep]) @ U.T


# --------------------------------------------------------------------------- per-sample pass
class SampleAccumulator:
    """Per-sample measurements against fixed class means (and classifier), streamed over batches.

    * NCC mismatch (Papyan 2020, Fig. 7): fraction of samples where argmax_c (W h + b)_c differs from
      the nearest class centre argmin_c ||h - mu_c||.  Also the NCC accuracy.
    * accuracy of the classifier.
    * cosine margins (Markou 2024): cos(h - mu_G, w_y) - max_{c != y} cos(h - mu_G, w_c) with the
      classifier rows centred over classes; their average, and optionally every per-sample value.
    * with ``within_class=True`` (only valid on the set the means came from) the sum of
      ||S_r^-1 Vh_r (h_i - mu_{y_i})||^2 that gives Tr(Sigma_W Sigma_B^+)/C. Without ``shift`` it comes
      from the shared product, (h - mu_G).Mdot_c - (mu_y - mu_G).Mdot_c (in memory, :func:`measure_collapse`).
      With ``shift`` (C x p, per-class reference points such as :attr:`CollapseAccumulator.shift`, the
      streamed second pass) it is taken as Z = (h - k_y) (G^+ Mdot)^T in the features' dtype minus
      (G^+ Mdot)(mu_y - k_y) in float64: deviations from a point inside the class are small, so float32
      features keep their accuracy at collapse, as in the one-pass scatter, at a cost of N p C (an extra
      product of the batch with C rows) instead of the scatter's N p^2.

    One product of the centred batch with [Mdot; W]^T serves all of them. It is taken on h/s and W/t,
    s and t powers of two that bring the centred means and W to magnitude ~1 when they lie outside
    [2^-20, 2^20] (``scale`` sets s; see "Numeric range" in the module doc): every result is invariant.
    """

    def __init__(self, means: Tensor, mu_G: Tensor, W: Tensor | None = None, b: Tensor | None = None, *,
                 within_class: bool = False, keep_margins: bool = False, means_gram: Tensor | None = None,
                 scale: float | None = None, shift: Tensor | None = None) -> None:
        self.means = means.to(torch.float64)
        self.mu_G = mu_G.to(torch.float64)
        self.num_classes, self.p = means.shape
        self.W, self.b = _check_classifier(W, b, self.num_classes, self.p)
        Mdot = self.means - self.mu_G
        self.scale = _power_of_two_scale(float(Mdot.abs().max())) if scale is None else float(scale)
        s = self.scale
        if s != 1.0:
            Mdot = Mdot / s  # exact: s is a power of two
        self._mu_G = self.mu_G / s
        self._Mdot = Mdot
        self._mdot_sq = Mdot.pow(2).sum(1)
        rows = [Mdot]
        if self.W is not None:
            t = _power_of_two_scale(float(self.W.abs().max()))
            Wt = self.W if t == 1.0 else self.W / t
            self._Wc_norm = (Wt - Wt.mean(0)).norm(dim=1)
            # logits over s t: (W/t)(h/s) + (W mu_G + b)/(s t) - (W/t)(mu_G/s) = (W h + b)/(s t), same argmax
            self._logit_offset = (Wt @ self.mu_G + (0 if self.b is None else self.b / t)) / s
            rows.append(Wt)
        self._K = torch.cat(rows, 0)  # (C or 2C) x p
        self.within_class = within_class
        if within_class:
            # ||S_r^-1 Vh_r r||^2 = ||G^+ Mdot r||^2 (see between_class_gram_pinv), invariant under
            # Mdot, r -> Mdot/s, r/s
            gram = Mdot @ Mdot.T if means_gram is None else means_gram if s == 1.0 else means_gram / (s * s)
            self._nc1_map = between_class_gram_pinv(Mdot, gram)  # C x C
            self._nc1_offsets = gram  # row y: Mdot_y . Mdot_c
        self._shift = None
        if shift is not None:
            if not within_class:
                raise ValueError("shift is used only by the within-class variability; pass within_class=True.")
            shift = torch.as_tensor(shift).detach().to(self.means.device, torch.float64)
            if shift.shape != self.means.shape:
                raise ValueError(f"shift must have the shape of the class means {tuple(self.means.shape)}; "
                                 f"got {tuple(shift.shape)}.")
            self._shift = shift
            self._nc1_proj = self._nc1_map @ Mdot  # C x p, on the scaled means: (G_s^+ Mdot_s)(r/s) = G^+ Mdot r
            self._shift_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self.n = 0
        self.ncc_agree = 0
        self.ncc_correct = 0
        self.correct = 0
        self.margin_sum = 0.0
        self.nc1_sum = 0.0
        self.margins: list[Tensor] | None = [] if keep_margins else None

    def update(self, features: Tensor, labels: Tensor) -> None:
        features = _check_features(features)
        if features.shape[1] != self.p:
            raise ValueError(f"features have {features.shape[1]} columns but the class means have {self.p}.")
        labels = _check_labels(labels, features.shape[0], self.num_classes).to(features.device)
        C = self.num_classes
        gram_pinv = self._nc1_map.to(features) if self.within_class else None
        offsets = self._nc1_offsets.to(features) if self.within_class else None
        K, mu_G = self._K.to(features), self._mu_G.to(features)
        for s in range(0, features.shape[0], CHUNK):
            X, y = features[s:s + CHUNK], labels[s:s + CHUNK]
            # centred on the global mean, over the scale s (exact)
            Xc = X - mu_G if self.scale == 1.0 else torch.mul(X, 1.0 / self.scale).sub_(mu_G)
            # the NaN/Inf check on B row norms rather than on B x p features: any NaN or Inf reaches them, and so
            # does an overflow of the squares
            h_norm = Xc.norm(dim=1)
            if not bool(torch.isfinite(h_norm.sum())):
                _raise_if_not_finite(X)
                raise _range_error(X, float(self._Mdot.abs().max()) * self.scale)
            G = Xc @ K.T  # B x (C or 2C), in the features' dtype
            proj = G[:, :C]  # (h - mu_G) . Mdot_c
            ncc = (self._mdot_sq.to(G) - 2 * proj).argmin(1)
            self.ncc_correct += int((ncc == y).sum())
            if self._shift is not None:
                # deviations from the per-class shift, projected in the features' dtype; their offset from the
                # class mean, (G^+ Mdot)(mu_y - k_y), subtracted in float64
                k, P, O = self._shifted_map(features.dtype, features.device)
                D = X - k[y] if self.scale == 1.0 else (X - k[y]).mul_(1.0 / self.scale)
                nc1 = float((D @ P.T).to(torch.float64).sub_(O[y]).pow_(2).sum())
                if not math.isfinite(nc1):
                    raise _range_error(X, float(self._Mdot.abs().max()) * self.scale)
                self.nc1_sum += nc1
            elif self.within_class:
                # residual projections Mdot (h - mu_y) and the C x C product in the features' dtype (proj
                # carries that dtype's rounding already), the sum of squares in float64
                R = proj - offsets[y]
                nc1 = float((R @ gram_pinv).pow(2).sum(dtype=torch.float64))
                if not math.isfinite(nc1):
                    raise _range_error(X, float(self._Mdot.abs().max()) * self.scale)
                self.nc1_sum += nc1
            if self.W is not None:
                raw = G[:, C:]  # (h - mu_G) . w_c
                pred = (raw + self._logit_offset.to(G)).argmax(1)
                self.correct += int((pred == y).sum())
                self.ncc_agree += int((pred == ncc).sum())
                # cosine with centred rows: (h - mu_G).(w_c - wbar) = raw_c - mean_c raw_c
                h_norm = h_norm.clamp_min(1e-30)
                cos = (raw - raw.mean(1, keepdim=True)) / (h_norm[:, None] * self._Wc_norm.to(G).clamp_min(1e-30))
                own = cos.gather(1, y[:, None]).squeeze(1)
                other = cos.scatter(1, y[:, None], float("-inf")).max(1).values
                m = (own - other).to(torch.float64)
                self.margin_sum += float(m.sum())
                if self.margins is not None:
                    self.margins.append(m)
            self.n += X.shape[0]

    def _shifted_map(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(k, P, O) for features of ``dtype``: the shift k cast to it, P = G_s^+ Mdot_s (C x p) cast to it,
        and O[y] = P (mu_y - k_y)/s in float64 with the *cast* k, so that a shift not representable in
        ``dtype`` (merged across ranks) still centres exactly on the class mean."""
        key = (dtype, device)
        if key not in self._shift_cache:
            k = self._shift.to(dtype)
            O = ((self.means - k.to(torch.float64)) / self.scale) @ self._nc1_proj.T
            self._shift_cache[key] = (k.to(device), self._nc1_proj.to(device, dtype), O.to(device))
        return self._shift_cache[key]

    def result(self, suffix: str = "") -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no samples were given to the per-sample pass.")
        out = {"ncc_accuracy" + suffix: self.ncc_correct / self.n}
        if self.W is not None:
            out["accuracy" + suffix] = self.correct / self.n
            out["ncc_mismatch" + suffix] = 1.0 - self.ncc_agree / self.n
            out["average_cosine_margin" + suffix] = self.margin_sum / self.n
        if self.within_class:
            out["within_class_variability" + suffix] = self.nc1_sum / self.n
        return out

    def per_sample_margins(self) -> Tensor:
        """Every per-sample cosine margin seen so far, in order (needs ``keep_margins=True``)."""
        if self.margins is None:
            raise ValueError("per-sample margins were not kept; create the pass with keep_margins=True.")
        return torch.cat(self.margins) if self.margins else torch.empty(0, dtype=torch.float64)


# --------------------------------------------------------------------------- in memory
def _add_class_sums(target: Tensor, labels: Tensor, X: Tensor, weight: float = 1.0) -> None:
    """target[c] += weight * (sum of the rows of X with label c) (target float64). A one-hot product for few
    classes (index_add_ serialises on the few rows it writes), index_add_ for many."""
    C = target.shape[0]
    if C <= 64:
        target.add_((torch.nn.functional.one_hot(labels, C).to(X.dtype).T @ X).to(target.dtype), alpha=weight)
    else:
        target.index_add_(0, labels, X.to(target.dtype), alpha=weight)


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means (C x p, float64, summed in float64 chunk by chunk) and counts (C,).

    Identical features give identical means: float64 sums of up to 2^29 equal float32 values are exact,
    and float64 features are summed as deviations from the first sample, mu_c = h_1 + mean_{i in c}(h_i - h_1)."""
    counts = torch.bincount(labels, minlength=num_classes)
    _check_counts(counts)
    features = features.detach()
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    ref = features[:1] if features.dtype == torch.float64 else None
    for s in range(0, features.shape[0], MEAN_CHUNK):  # small chunks: the float64 copy stays in cache (no name
        # holds it past its call, so that the next chunk reuses its memory)
        X = features[s:s + MEAN_CHUNK]
        _add_class_sums(sums, labels[s:s + MEAN_CHUNK], X.to(torch.float64) if ref is None else X - ref)
    if not bool(torch.isfinite(sums).all()):
        _raise_if_not_finite(features)
        raise ValueError(f"features of magnitude up to {float(features.abs().max()):.3g} overflow float64 "
                         "class sums; rescale them.")
    means = sums / counts[:, None].to(torch.float64)
    return (means if ref is None else ref + means), counts


def within_class_variability(features: Tensor, labels: Tensor, num_classes: int, *,
                             mean_convention: str = "class_means") -> float:
    """Tr(Sigma_W Sigma_B^+)/C (Papyan 2020, Fig. 6; Zhu's and Markou's NC1) from features in memory.

    Papyan's Colab reports C times this value. Computed on the (C-1)-dim between-class subspace:
    (1/N) sum_i ||S_r^-1 Vh_r (h_i - mu_{y_i})||^2 with Mdot = Uc S Vh, never a p x p pseudo-inverse."""
    num_classes = check_int("num_classes", num_classes, 2)
    features = _check_features(features)
    labels = _check_labels(labels, features.shape[0], num_classes).to(features.device)
    means, counts = class_means(features, labels, num_classes)
    mu_G = global_mean(means, counts, mean_convention)
    # on h/scale (exact, a power of two; the result is scale-invariant: module doc, "Numeric range")
    scale = _power_of_two_scale(_check_centred_means(means, mu_G))
    Mdot = means - mu_G if scale == 1.0 else (means - mu_G) / scale
    mu_G = (mu_G / scale).to(features)
    gram_pinv = between_class_gram_pinv(Mdot)
    # project on the pseudo-inverse-weighted directions G^+ Mdot directly: one N x p x C product
    P = (gram_pinv @ Mdot).to(features)  # C x p
    offsets = Mdot @ (gram_pinv @ Mdot).T  # row y: (G^+ Mdot (mu_y - mu_G))^T, C x C float64
    total = 0.0
    for s in range(0, features.shape[0], CHUNK):
        X, y = features[s:s + CHUNK], labels[s:s + CHUNK]
        Z = ((X - mu_G) if scale == 1.0 else torch.mul(X, 1.0 / scale).sub_(mu_G)) @ P.T
        total += float((Z.to(torch.float64) - offsets[y]).pow(2).sum())
    if not math.isfinite(total):
        _raise_if_not_finite(features)
        raise _range_error(features, float(Mdot.abs().max()) * scale)
    return total / features.shape[0]


def measure_collapse(features: Tensor, labels: Tensor, num_classes: int, W: Tensor | None = None,
                     b: Tensor | None = None, test_features: Tensor | None = None,
                     test_labels: Tensor | None = None, *, mean_convention: str = "class_means") -> dict[str, float]:
    """Every measurement of REFERENCE.md section 2 from features held in memory.

    ``features`` (N x p) and ``labels`` (N,) are the training set; W (C x p) and b (C,) the
    classifier, optional; a test set adds ``ncc_mismatch_test``, ``accuracy_test`` and
    ``average_cosine_margin_test`` (measured against the training means). See the module doc
    for the keys, formulas and how they are computed.
    """
    num_classes = check_int("num_classes", num_classes, 2)
    features = _check_features(features)
    labels = _check_labels(labels, features.shape[0], num_classes).to(features.device)
    W, b = _check_classifier(W, b, num_classes, features.shape[1])
    if test_labels is not None and test_features is None:
        raise ValueError("test_labels were given without test_features; pass both or neither.")
    means, counts = class_means(features, labels, num_classes)
    mu_G = global_mean(means, counts, mean_convention)
    _check_centred_means(means, mu_G)
    gram = centred_means_gram(means, mu_G)
    out = geometry(means, mu_G, W, b, means_gram=gram)
    train = SampleAccumulator(means, mu_G, W, b, within_class=True, means_gram=gram)
    train.update(features, labels)
    out.update(train.result())
    if test_features is not None:
        test_features = _check_features(test_features, "test_features")
        if test_labels is None:
            raise ValueError("test_features were given without test_labels; pass both or neither.")
        test = SampleAccumulator(means, mu_G, W, b)
        test.update(test_features, _check_labels(test_labels, test_features.shape[0], num_classes, "test_labels"))
        out.update(test.result("_test"))
    return out


def cosine_margins(features: Tensor, labels: Tensor, W: Tensor, global_mean: Tensor) -> Tensor:
    """Per-sample cosine margins (Markou 2024): cos(h_i - mu_G, w_{y_i}) - max_{c != y_i} cos(h_i - mu_G, w_c),
    W centred over classes. Returns an (N,) float64 tensor; sort it for Markou's PCM plot."""
    features = _check_features(features)
    p = features.shape[1]
    W = torch.as_tensor(W).detach()
    if W.ndim != 2 or W.shape[1] != p or W.shape[0] < 2:
        raise ValueError(f"W must have shape (num_classes, feature_dim) = (C >= 2, {p}) to match the features; "
                         f"got {tuple(W.shape)}.")
    mu_G = torch.as_tensor(global_mean).detach().to(features.device, torch.float64)
    if mu_G.shape != (p,):
        raise ValueError(f"global_mean must have shape (feature_dim,) = ({p},) to match the features; "
                         f"got {tuple(mu_G.shape)}.")
    if not bool(torch.isfinite(mu_G).all()):
        raise ValueError("global_mean contains NaN or Inf values.")
    C = W.shape[0]
    placeholder = torch.zeros(C, p, dtype=torch.float64, device=features.device) + mu_G
    # the placeholder means carry no spread to scale by: take the features' own magnitude
    top = max(float(features.abs().max()) if features.numel() else 0.0, float(mu_G.abs().max()))
    acc = SampleAccumulator(placeholder, mu_G, W, None, keep_margins=True, scale=_power_of_two_scale(top))
    acc.update(features, labels)
    return acc.per_sample_margins()


# --------------------------------------------------------------------------- streaming
SCATTER_BLOCKS = 4


def _add_scatter(target: Tensor, D: Tensor, weight: float = 1.0) -> None:
    """target += weight * D^T D (float64) on and above the diagonal blocks only: block row i gets D_i^T D[:, i:].

    A symmetric rank-k update by hand: with 4 column blocks it does 10/16 of the full product's work (the
    blocks below the diagonal mirror those above). Only ``torch.triu(target)`` is meaningful; read the
    full matrix through :attr:`CollapseAccumulator.scatter`."""
    p = D.shape[1]
    if p < 128:
        target.add_((D.T @ D).to(target.dtype), alpha=weight)
        return
    step = -(-p // SCATTER_BLOCKS)
    for i in range(0, p, step):
        target[i:i + step, i:].add_((D[:, i:i + step].T @ D[:, i:]).to(target.dtype), alpha=weight)


class CollapseAccumulator:
    """Streaming collapse measurements: feed feature batches, never hold an N x p matrix.

    ``update(h, y)`` adds a batch (e.g. from a forward hook over a DataLoader). State, all float64:
    counts, a per-class shift k_c (the first sample of the class that it sees), the shifted class sums d_c = sum_{i in c}(h_i - k_c) and the shifted scatter
    A = sum_i (h_i - k_{y_i})(h_i - k_{y_i})^T (p x p). Then the pooled within-class scatter is
    N Sigma_W = A - sum_c d_c d_c^T / n_c, well conditioned because the shift lies within the class's spread.
    :meth:`result` projects it on the (C-1)-dim between-class subspace:
    Tr(Sigma_W Sigma_B^+)/C = (1/N) Tr(G^+ Mdot (N Sigma_W) Mdot^T G^+), G = Mdot Mdot^T (C x C).
    The state is kept in the features' units; a batch's products are taken on (h - k_y)/s, s a power of
    two that brings the shifts to magnitude ~1 when they lie outside [2^-20, 2^20], and added back times
    s and s^2 (exact; module doc, "Numeric range"). Numpy arrays are accepted as tensors.

    ``keep_scatter=False`` skips A (the N p^2 work and the p x p state: nearly all of the pass's cost at
    large p) when a second pass will run: :meth:`result` then has no ``within_class_variability``, and
    ``sample_pass(within_class=True)`` measures it from the centred features projected on the final
    between-class subspace instead, at N p C (what :func:`nc_lib.features.measure` does whenever it
    makes its second training pass).
    """

    def __init__(self, num_classes: int, *, mean_convention: str = "class_means", keep_scatter: bool = True) -> None:
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.mean_convention = check_choice("mean_convention", mean_convention, MEAN_CONVENTIONS)
        if not isinstance(keep_scatter, bool):
            raise ValueError(f"keep_scatter must be True or False; got {keep_scatter!r}.")
        self.keep_scatter = keep_scatter
        self.p: int | None = None
        self.counts = self.shift = self.shifted_sums = None
        self._scatter: Tensor | None = None  # upper block triangle of A (see _add_scatter)
        self.seen: Tensor | None = None

    def _init(self, p: int, device: torch.device) -> None:
        C, f64 = self.num_classes, torch.float64
        self.p = p
        self.shift = torch.zeros(C, p, dtype=f64, device=device)
        self.shifted_sums = torch.zeros(C, p, dtype=f64, device=device)
        self._scatter = torch.zeros(p, p, dtype=f64, device=device) if self.keep_scatter else None
        self.counts = torch.zeros(C, dtype=torch.long, device=device)
        self.seen = torch.zeros(C, dtype=torch.bool, device=device)
        self._shift_cast = self.shift
        self._scale = 1.0  # the power of two the batches' products are taken over (class doc)

    def update(self, features: Tensor, labels: Tensor) -> None:
        features = _check_features(features)
        if self.p is None:
            self._init(features.shape[1], features.device)
        elif features.shape[1] != self.p:
            raise ValueError(f"features have {features.shape[1]} columns; earlier batches had {self.p}.")
        y = _check_labels(labels, features.shape[0], self.num_classes).to(features.device)
        batch_counts = torch.bincount(y, minlength=self.num_classes)
        new = (batch_counts > 0) & ~self.seen
        if bool(new.any()):  # shift k_c: the first sample of class c ever seen
            B = y.shape[0]
            first = torch.full((self.num_classes,), B, dtype=torch.long, device=y.device)
            first.scatter_reduce_(0, y, torch.arange(B, device=y.device), reduce="amin")
            self.shift[new] = features[first[new]].to(torch.float64)
            self.seen |= new
            self._shift_cast = self.shift.to(features.dtype)
            self._scale = _power_of_two_scale(float(self.shift[self.seen].abs().max()))
        # one pass: deviations from a sample of the same class are small, so the features' dtype holds them
        # accurately; their sums and their scatter are accumulated in float64
        D = features - self._shift_cast[y]
        s = self._scale
        if s != 1.0:
            D.mul_(1.0 / s)  # exact: a power of two
        self.counts += batch_counts
        _add_class_sums(self.shifted_sums, y, D, s)
        if self._scatter is not None:
            _add_scatter(self._scatter, D, s * s)
        # NaN or Inf features reach the sums; an overflow of the squares reaches the scatter's diagonal first
        finite = torch.isfinite(self.shifted_sums).all()
        if self._scatter is not None:
            finite &= torch.isfinite(torch.diagonal(self._scatter)).all()
        if not bool(finite):
            _raise_if_not_finite(features)
            raise _range_error(features, float(self.shift[self.seen].abs().max()), "first samples of the classes")

    @property
    def scatter(self) -> Tensor | None:
        """The shifted scatter A = sum_i (h_i - k_{y_i})(h_i - k_{y_i})^T (p x p, float64, symmetric)."""
        if self._scatter is None:
            return None
        return torch.triu(self._scatter) + torch.triu(self._scatter, 1).T

    @scatter.setter
    def scatter(self, value: Tensor) -> None:  # a full symmetric matrix is valid upper-triangle storage
        self._scatter = value

    @property
    def n(self) -> int:
        return 0 if self.counts is None else int(self.counts.sum())

    @property
    def means(self) -> Tensor:
        if self.counts is None:
            raise ValueError("no batches were given to the accumulator.")
        _check_counts(self.counts)
        return self.shift + self.shifted_sums / self.counts[:, None].to(torch.float64)

    @property
    def global_mean(self) -> Tensor:
        return global_mean(self.means, self.counts, self.mean_convention)

    def within_class_scatter_projected(self, basis: Tensor) -> Tensor:
        """B (N Sigma_W) B^T for an (r x p) matrix B, in O(p^2 r)."""
        if self._scatter is None:
            raise ValueError("the accumulator was created with keep_scatter=False; it has no within-class scatter.")
        dbar = self.shifted_sums / self.counts[:, None].to(torch.float64)
        AB = self.scatter @ basis.T  # p x r
        DB = self.shifted_sums @ basis.T  # C x r
        return basis @ AB - (dbar @ basis.T).T @ DB

    def result(self, W: Tensor | None = None, b: Tensor | None = None) -> dict[str, float]:
        """Within-class variability and every means/classifier measurement (no per-sample pass); without the
        scatter (``keep_scatter=False``) every one but the within-class variability."""
        means, mu_G = self.means, self.global_mean
        scale = _power_of_two_scale(_check_centred_means(means, mu_G))
        W, b = _check_classifier(W, b, self.num_classes, self.p)
        gram = centred_means_gram(means, mu_G)
        out = geometry(means, mu_G, W, b, means_gram=gram)
        # on Mdot/scale: Tr(G^+ Mdot X Mdot^T G^+) scales as scale^-2 (exact, a power of two)
        if self._scatter is None:
            return out
        Mdot = means - mu_G if scale == 1.0 else (means - mu_G) / scale
        Gp = between_class_gram_pinv(Mdot, gram if scale == 1.0 else gram / scale ** 2)
        proj = self.within_class_scatter_projected(Mdot)  # Mdot (N Sigma_W) Mdot^T, C x C
        nc1 = float(torch.trace(Gp @ proj @ Gp)) / scale ** 2 / self.n
        if not math.isfinite(nc1):
            raise ValueError(f"the within-class scatter of features of magnitude ~{float(means.abs().max()):.3g} "
                             "overflows float64; rescale the features.")
        out["within_class_variability"] = nc1
        return out

    def sample_pass(self, W: Tensor | None = None, b: Tensor | None = None, *,
                    keep_margins: bool = False, within_class: bool = False) -> SampleAccumulator:
        """A second pass against the final means: NCC mismatch, accuracy and cosine margins. With
        ``within_class=True`` (on the same set as this accumulator) also Tr(Sigma_W Sigma_B^+)/C, from the
        features' deviations from this accumulator's per-class shifts projected on the between-class
        subspace (N p C; see :class:`SampleAccumulator`)."""
        means, mu_G = self.means, self.global_mean
        _check_centred_means(means, mu_G)
        return SampleAccumulator(means, mu_G, W, b, keep_margins=keep_margins, within_class=within_class,
                                 shift=self.shift if within_class else None)


def measure_batches(batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, W: Tensor | None = None,
                    b: Tensor | None = None) -> dict[str, float]:
    """Convenience: stream ``(features, labels)`` batches through a :class:`CollapseAccumulator`."""
    acc = CollapseAccumulator(num_classes)
    for h, y in batches:
        acc.update(h, y)
    return acc.result(W, b)
