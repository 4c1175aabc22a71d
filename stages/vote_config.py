"""The ``[vote]`` settings: how a problem's samples are combined (re-exported by ``stages.config``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stages.settings import check, setting

VoteRule = Literal[
    "code", "majority", "entropy", "aimo3-second", "deepconf-lowest", "deepconf-bottom10", "deepconf-tail"
]
EntropyStat = Literal["mean", "median"]
DEEPCONF_RULES = ("deepconf-lowest", "deepconf-bottom10", "deepconf-tail")
VOTE_RULES: tuple[str, ...] = ("code", "majority", "entropy", "aimo3-second", *DEEPCONF_RULES)
ENTROPY_RULES = ("entropy", "aimo3-second", *DEEPCONF_RULES)  # the rules that need the top-k log-probs


@dataclass(frozen=True)
class VoteConfig:
    """How a problem's samples are combined (``stages/selection.py`` has the rules).

    ``rule``: ``code`` (default) counts each valid answer with ``code_weight`` for a sample whose code
    ran and every cell ran cleanly, 1 for the rest; with ``confidence``, times the sample's confidence,
    1 / (mean surprisal of its tokens + 0.1), where the mean surprisal (minus the mean log-probability
    of the tokens it drew) is a sampled estimate of its mean token entropy. ``majority`` counts every
    valid answer once. ``entropy`` (the AIMO 3 winners' weight) counts a sample with
    1 / max(its entropy, 1e-9), its entropy the ``entropy_stat`` (mean or median) over its last
    ``entropy_tokens`` tokens (``None``: all) of each token's entropy over its top-k log-probabilities
    (``generation.top_logprobs`` k, in bits). ``aimo3-second`` (the AIMO 3 second place's score)
    scores each answer vote share x 3.0 + (1 / the median of its samples' entropies) x 0.1 +
    consensus x 0.3 (consensus: the answer holds more than half of the valid votes), each sample's
    entropy the mean over its last ``entropy_tokens`` (256 there).
    ``deepconf-lowest``, ``deepconf-bottom10``, ``deepconf-tail`` (DeepConf's offline weighted vote)
    keep the ``deepconf_keep`` share of a problem's samples that are most confident (lowest group,
    bottom-10% groups or tail confidence over ``deepconf_window``-token windows, a token's confidence
    minus the mean of its top-k log-probabilities) and sum each kept sample's confidence per answer.
    They read the samples' token confidences (``generation.confidences``, kept by the inference stage
    and by a record's re-scoring, ``python -m pipeline report --rules``).
    DeepConf online (``stages/confidence_stop.py``): with ``deepconf_stop`` a fixed threshold, or
    ``deepconf_warmup`` N (the ``(1 - deepconf_keep)`` percentile of the lowest window confidence of a
    problem's first N finished samples), a sample is stopped once a full ``deepconf_window``-token
    window's mean confidence falls below the threshold, and its answer is left out of the vote.
    The highest total wins; ties go to the answer with more samples, then to the one whose first
    sample has the lowest index. ``early_stop`` ends a problem once that many samples agree; a problem
    also ends once the leader cannot be overtaken by the samples still running (for the rules whose
    weights have a bound). Its other samples are cancelled.
    """

    rule: VoteRule = setting(  # noqa: RUF009 (a Literal)
        "code",
        flag="--vote-rule",
        help="how samples are combined: code, majority, entropy, aimo3-second, deepconf-lowest, "
        "deepconf-bottom10, deepconf-tail",
    )
    code_weight: float = setting(
        2.0, flag="--code-weight", help="vote weight of a sample whose code ran cleanly"
    )
    confidence: bool = setting(
        False,
        flag="--confidence",
        help="rule code: weigh votes by the sample's confidence (1 / mean token surprisal; default off)",
    )
    entropy_tokens: int | None = setting(
        None, flag="--entropy-tokens", help="entropy rules: a sample's entropy over its last N tokens (all)"
    )
    entropy_stat: EntropyStat = setting(  # noqa: RUF009 (a Literal)
        "mean", flag="--entropy-stat", help="entropy rule: a sample's entropy is the mean or median"
    )
    deepconf_keep: float = setting(
        0.9,
        flag="--deepconf-keep",
        help="deepconf rules: the share of most confident samples kept (0.1 or 0.9)",
    )
    deepconf_window: int = setting(
        2048, flag="--deepconf-window", help="deepconf rules: tokens per sliding confidence window"
    )
    deepconf_stop: float | None = setting(
        None,
        flag="--deepconf-stop",
        help="stop a sample once a window's mean token confidence falls below this (DeepConf online)",
    )
    deepconf_warmup: int | None = setting(
        None,
        flag="--deepconf-warmup",
        help="stop samples below the (1 - keep) percentile of the lowest window confidence of each "
        "problem's first N finished samples (DeepConf online)",
    )
    early_stop: int | None = setting(
        None,
        flag="--early-stop",
        help="end a problem once this many samples agree, or once its leader cannot be overtaken",
    )

    def __post_init__(self) -> None:
        check(self.rule in VOTE_RULES, "vote.rule", f"must be one of {', '.join(VOTE_RULES)}")
        check(self.code_weight > 0, "vote.code_weight", "must be positive")
        check(self.early_stop is None or self.early_stop >= 1, "vote.early_stop", "must be at least 1")
        check(
            self.entropy_tokens is None or self.entropy_tokens >= 1,
            "vote.entropy_tokens",
            "must be at least 1",
        )
        check(0 < self.deepconf_keep <= 1, "vote.deepconf_keep", "must be in (0, 1]")
        check(self.deepconf_window >= 1, "vote.deepconf_window", "must be at least 1")
        check(
            self.deepconf_stop is None or self.deepconf_warmup is None,
            "vote.deepconf_stop",
            "a fixed threshold and a warmup are two ways to set it: give one",
        )
        check(
            self.deepconf_warmup is None or self.deepconf_warmup >= 1,
            "vote.deepconf_warmup",
            "must be at least 1",
        )
        check(
            self.deepconf_stop is None or math.isfinite(self.deepconf_stop),
            "vote.deepconf_stop",
            "must be a finite number",
        )
        check(self.entropy_stat in ("mean", "median"), "vote.entropy_stat", "must be mean or median")

    @property
    def stops_early(self) -> bool:
        """Whether samples are stopped online by their confidence (DeepConf online)."""
        return self.deepconf_stop is not None or self.deepconf_warmup is not None

    @property
    def needs_entropy(self) -> bool:
        """Whether the rule (or the online stop) reads the samples' top-k log-probabilities."""
        return self.rule in ENTROPY_RULES or self.stops_early
