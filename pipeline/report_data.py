"""The figures of a run report (``python -m pipeline report``), from a results file and its record.

A results file (``--output``) gives each problem's vote, gold answer, tokens, time and finish reasons.
A record (``--record``) gives each sample: its text, finish reason, token count and, when the run asked
for them (``--top-logprobs K``), its top-k log-probabilities. The per-sample figures a rule needs
(answer, tokens, finish reason, mean/tail/lowest-window confidence, entropies) are computed here from
the record, so re-scoring never needs the model: a sample's rounds are put together in round order
(its text the rounds' texts joined; code output is not in the record, so a tir sample's answer is the
last ``\\boxed{}`` its rounds wrote), its answer is ``stages.extraction.check_answer`` of that text under
``[answer]``. Cell errors are not recorded either: under the ``code`` rule a re-scored sample that took
more than one round counts as clean code. A sample the result counts but the record lacks (it failed
before a completion came back) counts as one without an answer. Without a record, pass@k and
majority@k come from each result's votes (the samples without an answer as ``None``; ties then break
in the votes' order).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.report_online import sweep
from stages.confidence_stop import LOW_CONFIDENCE
from stages.estimators import majority_at_k, mean_spread, pass_at_k
from stages.extraction import check_answer
from stages.items import Candidate, Encoded, Generation, Job, Problem, Result
from stages.selection import RULES, deepconf_stats, memoised, token_confidence, token_entropy
from stages.vote import tally
from stages.vote_config import ENTROPY_RULES, VoteConfig, VoteRule

RULE_SUBSETS = 32  # size-k subsets per (problem, k) a rule's accuracy against k is averaged over


class ReportError(Exception):
    """A results or record file that cannot be read; the message names the file and line."""


@dataclass
class Sample:
    """One recorded sample, its rounds put together."""

    index: int
    texts: list[str] = field(default_factory=list)
    finish: str = "eos"
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    logprobs: list[float] | None = None
    top: list[list[float]] | None = None


def _lines(path: Path, what: str) -> list[tuple[int, Any]]:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ReportError(f"cannot read the {what} file {path}: {e.strerror or e}") from e
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ReportError(f"{path} line {n}: not JSON ({e.msg})") from e
    return out


def load_results(path: str | Path) -> list[Result]:
    """The results of a results file, in file order (a later line for an id replaces an earlier one).

    Raises:
        ReportError: the file cannot be read, or a line is not a result (named by number).
    """
    p = Path(path)
    by_id: dict[str | None, Result] = {}
    for n, obj in _lines(p, "results"):
        try:
            r = Result.from_json(obj)
        except ValueError as e:
            raise ReportError(f"{p} line {n}: {e}") from e
        if not r.duplicate:
            by_id[r.id] = r
    if not by_id:
        raise ReportError(f"{p} holds no results")
    return list(by_id.values())


def load_record(path: str | Path) -> dict[str, list[Sample]]:
    """Each problem's recorded samples, by sample index.

    Raises:
        ReportError: the file cannot be read, or a line is not a record line (named by number).
    """
    p = Path(path)
    rounds: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = {}
    for n, rec in _lines(p, "record"):
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("text"), str):
            raise ReportError(f'{p} line {n}: not a record line (a JSON object with "id" and "text")')
        try:
            key = (str(rec["id"]), int(rec.get("sample") or 0))
            rounds.setdefault(key, []).append((int(rec.get("round", 0)), rec))
        except (TypeError, ValueError) as e:
            raise ReportError(f"{p} line {n}: {e}") from e
        bad = _bad_rows(rec)
        if bad:
            raise ReportError(f"{p} line {n}: {bad}")
    out: dict[str, list[Sample]] = {}
    for (pid, index), recs in sorted(rounds.items()):
        s = Sample(index)
        for _, rec in sorted(recs, key=lambda r: r[0]):
            s.texts.append(rec["text"])
            s.finish = str(rec.get("finish_reason") or "eos")
            s.seconds += float(rec.get("seconds") or 0.0)
            s.rounds += 1
            lp, top, ids = rec.get("logprobs"), rec.get("top_logprobs"), rec.get("token_ids")
            s.tokens += len(ids or lp or top or rec["text"].split())
            if lp:
                s.logprobs = [*(s.logprobs or []), *map(float, lp)]
            if top:
                s.top = [*(s.top or []), *([float(x) for x in row] for row in top)]
        out.setdefault(pid, []).append(s)
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad_rows(rec: dict[str, Any]) -> str | None:
    """What is wrong with a record line's log-probabilities, or ``None``."""
    lp, top = rec.get("logprobs"), rec.get("top_logprobs")
    if lp is not None and not (isinstance(lp, list) and all(map(_number, lp))):
        return '"logprobs" must be a list of numbers'
    if top is not None and not (
        isinstance(top, list) and all(isinstance(r, list) and all(map(_number, r)) for r in top)
    ):
        return '"top_logprobs" must be a list of lists of numbers (one per token)'
    return None


def candidates(pid: str, samples: Sequence[Sample], cfg: Config) -> list[Candidate]:
    """The samples as the vote stage sees them: answer checked, entropies and confidences from top-k."""
    encoded = Encoded(Job(Problem(pid, "(recorded)"), pid, 0), ())
    a = cfg.answer
    out = []
    for s in samples:
        text = "".join(s.texts)
        answer, extracted, reason = check_answer(text, modulus=a.modulus, lo=a.min, hi=a.max)
        if s.finish == "confidence":  # stopped online: left out of the vote, as in the live run
            answer, extracted, reason = None, None, LOW_CONFIDENCE
        top = s.top or []
        g = Generation(
            encoded=encoded,
            index=s.index,
            text=text,
            new_tokens=s.tokens,
            finish_reason=s.finish,
            logprobs=tuple(s.logprobs) if s.logprobs else None,
            of=len(samples),
            rounds=s.rounds,
            cells=s.rounds - 1,
            clean_cells=s.rounds - 1,
            entropies=tuple(h for t in top if (h := token_entropy(t)) is not None) if s.top else None,
            confidences=tuple(c for t in top if (c := token_confidence(t)) is not None) if s.top else None,
        )
        out.append(Candidate(g, answer, extracted, reason))
    return out


def _unrecorded(like: Generation, index: int) -> Candidate:
    """A sample the result counts that the record does not hold (it failed): no answer."""
    g = Generation(encoded=like.encoded, index=index, text="", new_tokens=0, finish_reason="error")
    return Candidate(g, None, None, "not in the record (the sample failed)")


def sample_stats(c: Candidate, window: int) -> dict[str, Any]:
    """The per-sample figures of the report (answer, tokens, finish, confidence statistics)."""
    g = c.generation
    conf = g.confidences
    return {
        "sample": g.index,
        "answer": c.answer,
        "tokens": g.new_tokens,
        "finish": g.finish_reason,
        "rounds": g.rounds,
        "logprob_mean": round(sum(g.logprobs) / len(g.logprobs), 5) if g.logprobs else None,
        "confidence": (
            {k: round(v, 5) for k, v in st.items()}
            if conf and (st := deepconf_stats(conf, window)) is not None
            else None
        ),
    }


def rule_answer(cands: Sequence[Candidate], vote: VoteConfig, fallback: int | None) -> int | None:
    """The answer ``vote`` gives over ``cands`` (``fallback`` when none is valid)."""
    winner = tally(cands, vote).winner
    return winner if winner is not None else fallback


def rule_at_k(cands: Sequence[Candidate], gold: int, k: int, vote: VoteConfig, fallback: int | None) -> float:
    """The rule's accuracy over size-``k`` subsets (every subset up to ``RULE_SUBSETS``, else that many
    drawn with a fixed seed)."""
    n = len(cands)
    if k >= n:
        return float(rule_answer(cands, vote, fallback) == gold)
    rng = random.Random(k)
    if math.comb(n, k) <= RULE_SUBSETS:
        subsets = [list(s) for s in itertools.combinations(range(n), k)]
    else:
        subsets = [sorted(rng.sample(range(n), k)) for _ in range(RULE_SUBSETS)]
    hits = sum(rule_answer([cands[i] for i in s], vote, fallback) == gold for s in subsets)
    return hits / len(subsets)


def _pct(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, math.ceil(q * len(v)) - 1)], 3)

    return {"p50": at(0.5), "p95": at(0.95), "max": round(v[-1], 3)}


def figures(
    results: Sequence[Result],
    record: dict[str, list[Sample]] | None,
    cfg: Config,
    rules: Sequence[str] = (),
) -> dict[str, Any]:
    """Every figure of the report, as JSON-ready values (see ``pipeline/report.py``)."""
    graded = [r for r in results if r.gold is not None]
    per: list[dict[str, Any]] = []
    cands_of: dict[str, list[Candidate]] = {}
    for r in results:
        if record is not None and r.id in record:
            cs = candidates(r.id or "", record[r.id or ""], cfg)
            top = max(c.generation.index for c in cs) + 1
            cs += [_unrecorded(cs[0].generation, top + i) for i in range(r.samples - len(cs))]
            cands_of[r.id or ""] = cs
            answers: list[int | None] = [c.answer for c in cs]
        else:
            answers = [a for a, n in r.votes.items() for _ in range(n)]
            answers += [None] * max(0, r.samples - len(answers))
        per.append({"result": r, "answers": answers})
    n_max = max((len(p["answers"]) for p in per), default=0)
    curves: dict[str, list[float | None]] = {"pass": [], "majority": []}
    spread: dict[str, list[dict[str, float]]] = {"pass": [], "majority": []}
    for k in range(1, n_max + 1):
        for name, f in (
            ("pass", lambda a, g, k: pass_at_k(len(a), sum(x == g for x in a), k)),
            ("majority", majority_at_k),
        ):
            ok = [
                f(p["answers"], p["result"].gold, k)
                for p in per
                if p["result"].gold is not None and len(p["answers"]) >= k
            ]
            s = mean_spread(ok) if ok else None
            curves[name].append(round(s.mean, 6) if s else None)
            spread[name].append(s.to_json() if s else {})
    share = [
        sum(a == p["result"].gold for a in p["answers"]) / len(p["answers"])
        for p in per
        if p["result"].gold is not None and p["answers"]
    ]
    accuracy = mean_spread([float(bool(r.correct)) for r in graded]) if graded else None
    pass_n = mean_spread(
        [float(p["result"].gold in p["answers"]) for p in per if p["result"].gold is not None]
    )
    samples = sum(len(p["answers"]) for p in per)
    no_answer = sum(a is None for p in per for a in p["answers"])
    finish: dict[str, int] = {}
    for r in results:
        for k2, v in r.finish.items():
            finish[k2] = finish.get(k2, 0) + v
    cut = [r for r in results if (r.error or "").startswith("time limit")]
    missed = [
        {
            "id": p["result"].id,
            "gold": p["result"].gold,
            "answer": p["result"].answer,
            "votes": {str(a): n for a, n in p["result"].votes.items()},
            "right_samples": sum(a == p["result"].gold for a in p["answers"]),
            "samples": len(p["answers"]),
        }
        for p in per
        if p["result"].gold is not None and not p["result"].correct and p["result"].gold in p["answers"]
    ]
    out: dict[str, Any] = {
        "problems": len(results),
        "graded": len(graded),
        "samples": samples,
        "accuracy": accuracy.to_json() if accuracy else None,
        "pass_at_k": curves["pass"],
        "majority_at_k": curves["majority"],
        "pass_at_k_spread": spread["pass"],
        "majority_at_k_spread": spread["majority"],
        "pass_at_1_averaged": mean_spread(share).to_json() if share else None,
        "pass_at_n": pass_n.to_json() if graded else None,
        "selection_loss": round(pass_n.mean - accuracy.mean, 6) if accuracy else None,
        "no_answer_share": round(no_answer / samples, 6) if samples else None,
        "status": {s: sum(r.status == s for r in results) for s in sorted({r.status for r in results})},
        "finish_reasons": finish,
        "tokens_per_problem": _pct([float(r.new_tokens) for r in results]),
        "seconds_per_problem": _pct([r.timings.get("total", 0.0) for r in results]),
        "time_budget_cut": {
            "problems": len(cut),
            "ids": [r.id for r in cut],
            "samples_cut": sum(r.finish.get("aborted", 0) for r in cut),
        },
        "early_stopped": sum(r.early_stop for r in results),
        "per_problem": [
            {
                "id": r.id,
                "tokens": r.new_tokens,
                "seconds": round(r.timings.get("total", 0.0), 3),
                "correct": r.correct,
            }
            for r in results
        ],
        "vote_wrong_sample_right": missed,
        "rules": {},
        "record": record is not None,
    }
    if record is not None:
        rows_of: dict[str, dict[int, Sequence[Sequence[float]]]] = {
            pid: {s.index: s.top or [] for s in ss} for pid, ss in record.items()
        }
        out["online_stop"] = sweep(results, cands_of, rows_of, cfg)
        out["samples_detail"] = {
            pid: [sample_stats(c, cfg.vote.deepconf_window) for c in cs] for pid, cs in cands_of.items()
        }
    with memoised():
        for rule in rules:
            out["rules"][rule] = rescore(rule, per, cands_of, record, cfg, n_max)
    return out


def rescore(
    rule: str,
    per: list[dict[str, Any]],
    cands_of: dict[str, list[Candidate]],
    record: dict[str, list[Sample]] | None,
    cfg: Config,
    n_max: int,
) -> dict[str, Any]:
    """One rule re-scored over the recorded samples: its answers, accuracy and accuracy against k."""
    if rule not in RULES:
        raise ReportError(f"unknown rule {rule!r}: one of {', '.join(RULES)}")
    if record is None:
        return {"needs": "--record RUN.jsonl (the samples re-scored)"}
    has_top = any(c.generation.entropies for cs in cands_of.values() for c in cs)
    if rule in ENTROPY_RULES and not has_top:
        return {"needs": "--top-logprobs (the record has no top-k log-probabilities)"}
    vote = replace(cfg.vote, rule=typing.cast(VoteRule, rule))
    fallback = cfg.answer.fallback
    answers: dict[str, int | None] = {}
    hits: list[float] = []
    at_k: list[list[float]] = [[] for _ in range(n_max)]
    for p in per:
        r = p["result"]
        cs = cands_of.get(r.id or "")
        if not cs:
            continue
        answers[r.id or ""] = rule_answer(cs, vote, fallback)
        if r.gold is not None:
            hits.append(float(answers[r.id or ""] == r.gold))
            for k in range(1, len(cs) + 1):
                at_k[k - 1].append(rule_at_k(cs, r.gold, k, vote, fallback))
    acc = mean_spread(hits) if hits else None
    return {
        "answers": answers,
        "accuracy": acc.to_json() if acc else None,
        "at_k": [round(math.fsum(v) / len(v), 6) if v else None for v in at_k],
        "differs_from_run": sorted(
            str(r.id) for p in per if (r := p["result"]).id in answers and answers[r.id or ""] != r.answer
        ),
    }


def config_of(path: str | None) -> Config:
    """The run's settings from a TOML file (``None``: the defaults), for the answer range and the
    rules' settings."""
    from pipeline.presets import resolve

    return resolve(None, path, {})[0]
