"""GPU-time estimates for prefill and decode, seeded from a profile and re-fitted online.

Prefill of ``n`` new tokens after ``c`` cached tokens::

    prefill_s(n, c) = base + per_token * n + attention * n * (c + n / 2)
                      \\__/   \\_____________/   \\_____________________/
             launch/sampling  weights (linear)   each new token attends to the cached context
                                                and, on average, to half of the new tokens

Decode: one engine step over a batch of ``B`` running sequences takes
``step_s(B) = step_base + step_per_seq * B`` (weights read once per step, KV read per sequence);
that is the time per output token (TPOT) every sequence sees. What one more decoding request adds
to a rank's GPU time is the marginal ``step_per_seq`` per output token: the step runs anyway for
the others, so charging a request ``step_s(B) / B`` would make a rank with a few long decodes look
busier than one that must prefill thousands of tokens, while batching hides most of that decode.
The load window therefore adds up prefill time plus marginal decode time.

Coefficients come from a profile file (``preble_hpc/profiles/NAME.json``, each naming its published
source) and, with ``online_fit``, are re-fitted from the timings workers report in ``Finished`` by
least squares with exponential forgetting, so the model follows the real model/GPU/engine
instead of one hard-coded pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from preble_hpc.config import ConfigError

__all__ = ["Profile", "CostModel", "ForgettingLeastSquares", "load_profile", "profile_names"]

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"

# Feature scales: RLS works on features of similar magnitude. These are unit conversions
# (per thousand tokens, per million token pairs), not tuning knobs.
_TOKENS_UNIT = 1e3
_PAIRS_UNIT = 1e6


@dataclass(frozen=True)
class Profile:
    """Cost-model coefficients for one model on one GPU (type), in seconds."""

    name: str
    model: str
    gpu: str
    tensor_parallel_size: int
    source: str
    """Where the figures come from (publication / benchmark, with its address)."""
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_attention_s: float
    """Seconds per (new token x context token) pair."""
    decode_step_base_s: float
    decode_step_per_seq_s: float
    derivation: str = ""
    """How the published figures became these coefficients."""

    @classmethod
    def from_dict(cls, d: dict, origin: str) -> Profile:
        try:
            pre, dec = d["prefill"], d["decode"]
            prof = cls(
                name=str(d["name"]),
                model=str(d["model"]),
                gpu=str(d["gpu"]),
                tensor_parallel_size=int(d.get("tensor_parallel_size", 1)),
                source=str(d["source"]),
                prefill_base_s=float(pre["base_s"]),
                prefill_per_token_s=float(pre["per_token_s"]),
                prefill_attention_s=float(pre["attention_s_per_token_pair"]),
                decode_step_base_s=float(dec["step_base_s"]),
                decode_step_per_seq_s=float(dec["step_per_seq_s"]),
                derivation=str(d.get("derivation", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"profile {origin}: missing or bad field ({exc!r})") from exc
        coeffs = (
            prof.prefill_base_s,
            prof.prefill_per_token_s,
            prof.prefill_attention_s,
            prof.decode_step_base_s,
            prof.decode_step_per_seq_s,
        )
        if any(not math.isfinite(c) or c < 0 for c in coeffs) or prof.prefill_per_token_s <= 0:
            raise ConfigError(f"profile {origin}: coefficients must be finite and >= 0: {coeffs}")
        if prof.decode_step_base_s + prof.decode_step_per_seq_s <= 0:
            raise ConfigError(f"profile {origin}: decode step time must be > 0")
        return prof


def profile_names() -> list[str]:
    """Profiles shipped with the package."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a JSON file by path; ConfigError lists the shipped ones."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(
            f"unknown cost-model profile {name_or_path!r}: give one of {profile_names()} "
            f"or the path of a profile JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"profile {path}: cannot read it ({exc})") from exc
    return Profile.from_dict(data, str(path))


class ForgettingLeastSquares:
    """Linear model ``y = theta . x`` fitted online by exponentially weighted least squares:
    each sample multiplies the weight of everything before it by ``lam`` (< 1 forgets old samples
    geometrically; this is recursive least squares with forgetting, kept as its normal equations).

    The prior is the profile: ``theta`` starts at its coefficients with a prior standard deviation
    equal to each coefficient, so a few consistent samples move it and one outlier does not.
    Samples are weighted by a relative noise ``rel_noise`` (timings scatter in proportion to their
    size). The 2x2 / 3x3 system is re-solved every ``refit_every`` samples (accumulating a sample
    is a few multiplications; solving costs more, and one sample moves the fit little).
    Coefficients stay >= 0 (a negative time per token is never physical).
    """

    def __init__(self, theta: list[float], lam: float, rel_noise: float, refit_every: int) -> None:
        k = len(theta)
        widest = max(t * t for t in theta) or 1.0
        # A zero prior coefficient still needs room to grow: give it the widest prior variance.
        info = [1.0 / (t * t) if t else 1.0 / widest for t in theta]
        self.a = [[info[i] if i == j else 0.0 for j in range(k)] for i in range(k)]
        self.b = [info[i] * theta[i] for i in range(k)]
        self.theta = list(theta)
        self.lam = lam
        self.rel_noise = rel_noise
        self.refit_every = refit_every
        self.samples = 0
        self._pending = 0

    def predict(self, x: list[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def update(self, x: list[float], y: float) -> bool:
        """Add one sample; returns True when the coefficients were re-solved."""
        noise = self.rel_noise * max(y, self.predict(x))
        w = 1.0 / (noise * noise) if noise > 0.0 else 0.0
        lam = self.lam
        a, b = self.a, self.b
        for i, xi in enumerate(x):
            wxi = w * xi
            row = a[i]
            for j, xj in enumerate(x):
                row[j] = lam * row[j] + wxi * xj
            b[i] = lam * b[i] + wxi * y
        self.samples += 1
        self._pending += 1
        if self._pending >= self.refit_every:
            self.solve()
            return True
        return False

    def solve(self) -> None:
        """Gaussian elimination with partial pivoting on copies of the normal equations."""
        self._pending = 0
        k = len(self.b)
        m = [row[:] + [self.b[i]] for i, row in enumerate(self.a)]
        for col in range(k):
            piv = max(range(col, k), key=lambda r: abs(m[r][col]))
            if m[piv][col] == 0.0:
                return  # singular: keep the current coefficients
            m[col], m[piv] = m[piv], m[col]
            for r in range(col + 1, k):
                f = m[r][col] / m[col][col]
                if f:
                    m[r] = [v - f * u for v, u in zip(m[r], m[col], strict=True)]
        sol = [0.0] * k
        for r in range(k - 1, -1, -1):
            acc = m[r][k] - sum(m[r][c] * sol[c] for c in range(r + 1, k))
            sol[r] = acc / m[r][r]
        self.theta = [v if v > 0.0 else 0.0 for v in sol]


class CostModel:
    """Prefill/decode time estimates for one model/GPU, optionally re-fitted online."""

    def __init__(
        self,
        profile: Profile,
        *,
        online_fit: bool = True,
        forgetting: float = 0.995,
        rel_noise: float = 0.2,
        refit_every: int = 8,
    ) -> None:
        self.profile = profile
        self.online_fit = online_fit
        self._prefill = ForgettingLeastSquares(
            [
                profile.prefill_base_s,
                profile.prefill_per_token_s * _TOKENS_UNIT,
                profile.prefill_attention_s * _PAIRS_UNIT,
            ],
            forgetting,
            rel_noise,
            refit_every,
        )
        self._decode = ForgettingLeastSquares(
            [profile.decode_step_base_s, profile.decode_step_per_seq_s],
            forgetting,
            rel_noise,
            refit_every,
        )
        self._refresh()

    @classmethod
    def from_config(cls, config) -> CostModel:  # config: SchedulerConfig (no import cycle)
        return cls(
            load_profile(config.profile),
            online_fit=config.online_fit,
            forgetting=config.cost_fit_forgetting,
            rel_noise=config.cost_fit_noise,
        )

    def _refresh(self) -> None:
        b, t, a = self._prefill.theta
        self.prefill_base_s = b
        self.prefill_per_token_s = t / _TOKENS_UNIT
        self.prefill_attention_s = a / _PAIRS_UNIT
        self.decode_step_base_s, self.decode_step_per_seq_s = self._decode.theta

    # ------------------------------------------------------------------ estimates

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Time to prefill ``new_tokens`` after ``cached_tokens`` already in the KV cache. A fully
        cached prompt still computes its last token (the engine needs its logits)."""
        n = new_tokens if new_tokens > 0 else 1
        return (
            self.prefill_base_s
            + self.prefill_per_token_s * n
            + self.prefill_attention_s * n * (cached_tokens + n * 0.5)
        )

    def recompute_s(self, tokens: int, context: int) -> float:
        """Marginal prefill time of ``tokens`` after ``context`` (no per-request overhead): the
        price of recomputing an evicted run of tokens inside some later prefill."""
        return self.prefill_per_token_s * tokens + self.prefill_attention_s * tokens * (
            context + tokens * 0.5
        )

    def step_s(self, batch: int) -> float:
        """One decode step (TPOT) with ``batch`` running sequences."""
        b = batch if batch > 1 else 1
        return self.decode_step_base_s + self.decode_step_per_seq_s * b

    def decode_s(self, tokens: int) -> float:
        """GPU time one more request adds to a running batch by decoding ``tokens`` tokens."""
        return tokens * self.decode_step_per_seq_s

    # ------------------------------------------------------------------ online fit

    def observe_prefill(self, new_tokens: int, cached_tokens: int, seconds: float) -> None:
        """A measured prefill (``Finished.prefill_s``)."""
        if not self.online_fit or new_tokens <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        n = float(new_tokens)
        x = [1.0, n / _TOKENS_UNIT, n * (cached_tokens + n * 0.5) / _PAIRS_UNIT]
        if self._prefill.update(x, seconds):
            self._refresh()

    def observe_decode(self, batch: int, seconds_per_token: float) -> None:
        """A measured TPOT (``Finished.decode_s_per_token``) at about ``batch`` sequences."""
        if not self.online_fit or not seconds_per_token > 0 or not math.isfinite(seconds_per_token):
            return
        if self._decode.update([1.0, float(max(batch, 1))], seconds_per_token):
            self._refresh()

    def coefficients(self) -> dict[str, float]:
        """Current coefficients (for stats and tests)."""
        return {
            "prefill_base_s": self.prefill_base_s,
            "prefill_per_token_s": self.prefill_per_token_s,
            "prefill_attention_s": self.prefill_attention_s,
            "decode_step_base_s": self.decode_step_base_s,
            "decode_step_per_seq_s": self.decode_step_per_seq_s,
            "prefill_samples": self._prefill.samples,
            "decode_samples": self._decode.samples,
        }
