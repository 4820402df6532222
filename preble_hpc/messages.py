"""The wire protocol between rank 0 and the worker ranks.

Every message is a plain slotted dataclass; the transport pickles them (batched). Rank 0 and the
workers share only this module, ``config`` and ``transport``. Errors travel as data
(``RequestError`` for one request, ``WorkerFailed`` for a whole rank) with the remote traceback,
never as exceptions across ranks.

Token accounting of one request, as reported in ``Finished``::

    prompt_token_ids:  [ t0 t1 ... t(c-1) | tc ... t(p-1) ]   -> completion tokens ...
                         \\_ cached_tokens _/ \\_ computed _/
    prompt_tokens = p, cached_tokens = c (served from the engine's prefix cache)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Sampling fields a request may set; anything else is rejected by name (no silent drop).
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "ignore_eos",
)


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling parameters, engine-neutral. Validated by ``validate()`` on rank 0 and again by
    the engine adapter (the worker must survive a bad request whoever sent it)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> SamplingSpec:
        """Build from a user dict (JSONL line, gRPC request); unknown keys raise ``ValueError``."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown sampling field(s) {unknown}; valid fields: {list(SAMPLING_FIELDS)}"
            )
        if "stop" in d:
            stop = d["stop"]
            d["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value and the valid range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise ValueError(f"top_k must be -1/0 (off) or >= 1, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


# ---------------------------------------------------------------- rank 0 -> worker


@dataclass(slots=True)
class Submit:
    """Run one request on the receiving worker."""

    request_id: str
    #: A list, or the ``array('I')`` rank 0 sends: it pickles ~4x faster on rank 0 and ~8x faster
    #: on the worker than a list of Python ints, at 4 bytes a token on the wire.
    prompt_token_ids: Sequence[int]
    sampling: SamplingSpec
    #: Tokens of the prompt that rank 0's tree believes this rank holds (a hint for the local
    #: scheduler's priority group; the engine's own prefix cache decides what is really reused).
    cached_hint: int = 0
    #: Rank 0's clock when the request arrived, for end-to-end latency accounting.
    arrival_time: float = 0.0


@dataclass(slots=True)
class Abort:
    """Stop a request (client cancelled, deadline passed) and free its KV."""

    request_id: str


@dataclass(slots=True)
class Shutdown:
    """Stop the worker. ``drain``: finish in-flight requests first; otherwise abort them."""

    drain: bool = True


# ---------------------------------------------------------------- worker -> rank 0


@dataclass(slots=True)
class WorkerReady:
    """Startup handshake: the worker's engine is up and this is what it can hold."""

    rank: int
    kv_capacity_tokens: int
    block_size: int
    max_model_len: int
    model: str
    host_kv_tokens: int = 0
    """KV tokens of its host-memory tier (KV offloading), 0 without one. The tier keeps a copy of
    what the GPU computes, so the rank holds a prefix until the larger of the two evicts it."""


@dataclass(slots=True)
class TokenDelta:
    """New output of a running request since the last delta."""

    request_id: str
    token_ids: list[int]
    text: str


@dataclass(slots=True)
class Finished:
    """A request ended (stop, length, abort). Carries the measured timings that feed rank 0's
    load window and cost-model fit."""

    request_id: str
    rank: int
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    #: Seconds from the worker receiving the request to the engine scheduling it.
    queue_s: float = 0.0
    #: Seconds from scheduling to the first output token (prefill of the uncached part).
    prefill_s: float = 0.0
    #: Mean seconds per output token after the first.
    decode_s_per_token: float = 0.0
    #: Final text / ids are in the deltas; repeated here only when no delta was streamed.
    text: str = ""
    token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RequestError:
    """One request failed (bad input, engine rejection). The worker keeps serving."""

    request_id: str
    rank: int
    message: str
    #: "invalid_argument" for user errors, "internal" otherwise (maps to gRPC codes on rank 0).
    kind: str = "invalid_argument"
    traceback: str = ""


class CacheEventKind(enum.Enum):
    STORED = "stored"
    EVICTED = "evicted"
    #: An engine event the worker could not map to tokens (e.g. a removed block whose parent chain
    #: was never seen). Reported instead of guessed; rank 0 counts them.
    UNMAPPED = "unmapped"
    #: The engine dropped its whole prefix cache (vLLM ``AllBlocksCleared``).
    CLEARED = "cleared"


@dataclass(slots=True)
class CacheEvent:
    """A change in one rank's prefix cache, expressed in tokens.

    ``token_ids`` is the whole prefix from the start of the prompt through the affected block;
    the block itself is its last ``block_tokens`` tokens::

        token_ids = [ ...parent prefix... | block ]
                                           \\_ block_tokens _/
    STORED: the rank now holds all of token_ids. EVICTED: the rank no longer holds the block nor
    anything below it on that path.
    """

    kind: CacheEventKind
    token_ids: tuple[int, ...] = ()
    block_tokens: int = 0
    detail: str = ""


@dataclass(slots=True)
class CacheReport:
    rank: int
    events: list[CacheEvent]


@dataclass(slots=True)
class LoadStats:
    """Periodic per-rank load snapshot."""

    rank: int
    time: float
    running: int
    waiting: int
    #: Fraction of KV blocks in use, 0..1.
    kv_usage: float
    #: Requests held by our local scheduler, not yet admitted to vLLM.
    local_queue: int = 0
    prefix_cache_hit_rate: float = 0.0


@dataclass(slots=True)
class WorkerFailed:
    """The worker cannot continue. Rank 0 fails or re-routes its requests and never waits on it."""

    rank: int
    message: str
    traceback: str = ""
    #: Requests that were in flight on this worker and got no ``Finished``.
    request_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class WorkerStopped:
    """The worker finished its shutdown (drained or aborted everything)."""

    rank: int
