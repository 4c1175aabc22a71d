"""``python -m pipeline report RESULTS.jsonl [--record RUN.jsonl] [--out DIR] [--rules a,b,c]``.

Writes ``DIR/report.md`` (accuracy; pass@k and majority@k for k = 1..n with the unbiased estimators
and their spread; pass@1 averaged; selection loss, pass@n minus the vote's accuracy; no-answer share;
finish reasons; tokens and time per problem; where a time budget cut samples; the problems the vote got
wrong while some sample was right; with ``--rules``, each rule re-scored over the recorded samples
without the model, side by side; with a record holding top-k log-probabilities, the tokens a DeepConf
online stop would have saved against accuracy, ``pipeline/report_online.py``), ``DIR/report.json``
(every figure) and, with matplotlib (the ``bench`` extra), ``DIR/accuracy_vs_k.png``,
``DIR/per_problem.png`` and ``DIR/online_stop.png``. The figures are computed in
``pipeline/report_data.py``. Exit codes: 0 written, 2 a missing or bad file (named, with its line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.report_data import ReportError, config_of, figures, load_record, load_results
from stages.selection import RULES

INSTALL_PLOTS = "plots need matplotlib: pip install 'aimo-pipeline[bench]'"


def build_parser() -> argparse.ArgumentParser:
    """The ``report`` subcommand's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline report",
        description="A run's report: accuracy, pass@k and majority@k, selection rules re-scored offline.",
    )
    p.add_argument("results", help="the results JSONL of a run (its --output)")
    p.add_argument("--record", help="the run's --record file: per-sample figures, and rules re-scored")
    p.add_argument("--out", default="report", help="folder for report.md, report.json, PNGs (report)")
    p.add_argument(
        "--rules",
        default="",
        help=f"comma-separated rules to re-score the record under: {', '.join(RULES)}",
    )
    p.add_argument(
        "--config",
        help="the run's TOML settings (answer range, the rules' settings); default: the defaults",
    )
    return p


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _spread(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.3f} (std {s['std']:.3f}, 95% CI {s['lo']:.3f}-{s['hi']:.3f})"


def markdown(fig: dict[str, Any], plots: list[str], plot_note: str | None) -> str:
    """The report page."""
    out = ["# Run report", ""]
    out += [
        f"{fig['problems']} problems ({fig['graded']} with a gold answer), {fig['samples']} samples.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| accuracy (the vote) | {_spread(fig['accuracy'])} |",
        f"| pass@n (some sample right) | {_spread(fig['pass_at_n'])} |",
        f"| selection loss (pass@n - accuracy) | {_f(fig['selection_loss'])} |",
        f"| pass@1 averaged | {_spread(fig['pass_at_1_averaged'])} |",
        f"| no-answer share of samples | {_f(fig['no_answer_share'])} |",
        f"| status | {', '.join(f'{k} {v}' for k, v in fig['status'].items())} |",
        f"| finish reasons | {', '.join(f'{k} {v}' for k, v in sorted(fig['finish_reasons'].items()))} |",
        f"| problems stopped early | {fig['early_stopped']} |",
    ]
    cut = fig["time_budget_cut"]
    ids = ", ".join(map(str, cut["ids"][:20])) + (" ..." if len(cut["ids"]) > 20 else "")
    out.append(
        f"| time budget cut | {cut['problems']} problems, {cut['samples_cut']} samples aborted {ids} |"
    )
    for name, key in (("tokens", "tokens_per_problem"), ("seconds", "seconds_per_problem")):
        v = fig[key]
        out.append(
            f"| {name} per problem p50 / p95 / max | {_f(v['p50'])} / {_f(v['p95'])} / {_f(v['max'])} |"
        )
    out += ["", "## Accuracy against k", ""]
    rules = {r: v for r, v in fig["rules"].items() if "at_k" in v}
    header = ["k", "pass@k", "majority@k", *rules]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i in range(len(fig["pass_at_k"])):
        row = [str(i + 1), _f(fig["pass_at_k"][i]), _f(fig["majority_at_k"][i])]
        row += [_f(v["at_k"][i] if i < len(v["at_k"]) else None) for v in rules.values()]
        out.append("| " + " | ".join(row) + " |")
    if fig["rules"]:
        out += ["", "## Rules re-scored on the recorded samples", ""]
        out += ["| rule | accuracy | problems whose answer differs from the run's |", "|---|---|---|"]
        for rule, v in fig["rules"].items():
            if "needs" in v:
                out.append(f"| {rule} | needs {v['needs']} | - |")
            else:
                out.append(f"| {rule} | {_spread(v['accuracy'])} | {len(v['differs_from_run'])} |")
    online = fig.get("online_stop")
    if online:
        out += ["", "## DeepConf online stop, replayed on the record", ""]
        if "needs" in online:
            out.append(f"Needs {online['needs']}.")
        else:
            out += [
                f"Window {online['window']} tokens, rule {online['rule']}; a threshold per problem from "
                f"its first {online['warmup']} samples (or fixed). Stopped samples do not vote.",
                "",
                "| setting | accuracy | tokens | tokens saved | samples stopped |",
                "|---|---|---|---|---|",
            ]
            for row in online["rows"]:
                saved = f"{100 * row['saved']:.1f}%" if row["saved"] is not None else "-"
                cells = [row["setting"], _f(row["accuracy"]), str(row["tokens"]), saved, str(row["stopped"])]
                out.append("| " + " | ".join(cells) + " |")
    out += ["", "## Problems the vote got wrong while some sample was right", ""]
    if fig["vote_wrong_sample_right"]:
        out += ["| id | gold | answer | votes | right samples |", "|---|---|---|---|---|"]
        for m in fig["vote_wrong_sample_right"]:
            votes = ", ".join(f"{a}: {n}" for a, n in m["votes"].items())
            out.append(
                f"| {m['id']} | {m['gold']} | {m['answer']} | {votes} | {m['right_samples']}/{m['samples']} |"
            )
    else:
        out.append("None.")
    out += ["", "## Plots", ""]
    out += [f"![{p}]({p})" for p in plots] or [plot_note or "None."]
    notes = [
        "pass@k: Chen et al. (2021)'s unbiased estimator; majority@k: the expected majority-vote accuracy",
        "over all size-k subsets (exact up to 5000 subsets, a fixed-seed Monte-Carlo estimate past it;",
        "ties to more samples, then the earliest sample). Spread: std over problems, bootstrap 95% CI.",
    ]
    if not fig["record"]:
        notes.append("Without --record, the samples come from each result's votes (the rest as no answer).")
    return "\n".join([*out, "", *notes, ""])


def plot(fig: dict[str, Any], out: Path) -> list[str]:
    """The PNGs, by file name.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ks = list(range(1, len(fig["pass_at_k"]) + 1))
    f, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ks, fig["pass_at_k"], marker="o", label="pass@k")
    ax.plot(ks, fig["majority_at_k"], marker="s", label="majority@k")
    for rule, v in fig["rules"].items():
        if "at_k" in v:
            ax.plot(ks[: len(v["at_k"])], v["at_k"], marker=".", linestyle="--", label=rule)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Accuracy against k")
    f.tight_layout()
    f.savefig(out / "accuracy_vs_k.png", dpi=110)
    plt.close(f)
    written.append("accuracy_vs_k.png")
    rows = fig["per_problem"]
    f, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = [
        "tab:green" if r["correct"] else "tab:red" if r["correct"] is False else "tab:gray" for r in rows
    ]
    xs = range(len(rows))
    a1.bar(xs, [r["seconds"] for r in rows], color=colors)
    a1.set_title("seconds per problem (green: right)")
    a2.bar(xs, [r["tokens"] for r in rows], color=colors)
    a2.set_title("new tokens per problem")
    for a in (a1, a2):
        a.set_xlabel("problem")
        a.grid(alpha=0.3, axis="y")
    f.tight_layout()
    f.savefig(out / "per_problem.png", dpi=110)
    plt.close(f)
    written.append("per_problem.png")
    online = fig.get("online_stop") or {}
    if online.get("rows"):
        f, ax = plt.subplots(figsize=(7, 4.5))
        for row in online["rows"]:
            if row["accuracy"] is None or row["saved"] is None:
                continue
            x = 100 * row["saved"]
            ax.scatter([x], [row["accuracy"]], s=40)
            ax.annotate(row["setting"], (x, row["accuracy"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("tokens saved (%)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"DeepConf online stop (window {online['window']}): tokens saved against accuracy")
        f.tight_layout()
        f.savefig(out / "online_stop.png", dpi=110)
        plt.close(f)
        written.append("online_stop.png")
    return written


def report(
    results: str, record: str | None, out: str | Path, rules: Sequence[str] = (), config: str | None = None
) -> dict[str, Any]:
    """Write the report files; returns the figures.

    Raises:
        ReportError: a file cannot be read, or a line of it is bad; or an unknown rule.
        ConfigError: the config file is invalid.
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ReportError(f"unknown rule {', '.join(unknown)}: the rules are {', '.join(RULES)}")
    cfg = config_of(config)
    fig = figures(load_results(results), load_record(record) if record else None, cfg, rules)
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the output folder {folder}: {e.strerror or e}") from e
    note = None
    try:
        plots = plot(fig, folder)
    except ImportError:
        plots, note = [], INSTALL_PLOTS
    fig["plots"] = plots
    if note:
        fig["plots_note"] = note
    (folder / "report.json").write_text(json.dumps(fig, indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown(fig, plots, note), encoding="utf-8")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline report``; returns the exit code."""
    args = build_parser().parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    try:
        fig = report(args.results, args.record, args.out, rules, args.config)
    except (ReportError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = fig["accuracy"]
    shown = f"accuracy {acc['mean']:.3f}" if acc else "no gold answers"
    print(f"report: {fig['problems']} problems, {shown}; written to {Path(args.out) / 'report.md'}")
    return 0
