# %% [markdown]
# # AIMO with aimo-pipeline: a complete notebook
#
# Paste into a Kaggle notebook (or run as a script). Offline: the model is a folder attached as a
# Kaggle input; the pipeline's wheel is attached too and installed with `pip install --no-index`.
# On a GPU it runs the vLLM backend; anywhere else (a laptop, CI) the transformers backend and the
# small bundled model, so the same file can be tried before it is submitted.

# %% Switches (the names older AIMO notebooks use) and the preset
import os

ENABLE_QUANTIZATION = False  # vLLM fp8 weights (halves weight memory on H100; some accuracy cost)
ENABLE_BATCH_PROCESSING = True  # a problem's samples share batches (off: one sample at a time)
AGGRESSIVE_MEMORY_CLEANUP = False  # leave more GPU memory free; a smaller result cache
ENABLE_CACHING = True  # result cache (the private rerun repeats problems) and vLLM prefix caching

MODEL_PATH = os.environ.get("AIMO_MODEL_PATH", "/kaggle/input/my-model/transformers/default/1")
TEST_CSV = os.environ.get("AIMO_TEST_CSV", "/kaggle/input/ai-mathematical-olympiad-progress-prize-3/test.csv")
TOTAL_BUDGET_S = float(os.environ.get("AIMO_TIME_BUDGET_S", 4.75 * 3600))  # of the 5 hours
EXPECTED_PROBLEMS = int(os.environ.get("AIMO_EXPECTED_PROBLEMS", 50))

# The recipe the strongest public AIMO 3 entries shared: several samples at temperature 1.0 with min-p.
PRESET_AIMO3_GPU = {
    "model": {"backend": "vllm", "memory_gb": 80},
    "generation": {"samples": 8, "temperature": 1.0, "top_p": 1.0, "min_p": 0.02, "max_new_tokens": 16384},
    "answer": {"min": 0, "max": 99999},
    "vllm": {"max_model_len": 32768},
}
# The same file on a machine without a GPU: the bundled small model, short answers.
PRESET_CPU_TRYOUT = {
    "model": {"backend": "transformers", "dtype": "float32"},
    "generation": {"samples": 1, "max_new_tokens": int(os.environ.get("AIMO_MAX_NEW_TOKENS", 64))},
}

# %% Configuration
from pipeline import Config  # noqa: E402
from pipeline.kaggle import make_predict  # noqa: E402


def has_gpu() -> bool:
    """Whether CUDA is usable (asked without importing torch at the top of the notebook)."""
    import torch

    return torch.cuda.is_available()


def build_config() -> Config:
    """The preset for this machine with the switches applied."""
    gpu = has_gpu()
    preset = PRESET_AIMO3_GPU if gpu else PRESET_CPU_TRYOUT
    cfg = Config.from_dict({k: dict(v) for k, v in preset.items()})
    if gpu or os.path.isdir(MODEL_PATH):
        cfg = cfg.replace(model={"path": MODEL_PATH})
    changes: dict[str, dict] = {
        "batch": {"max_batch_size": 16 if ENABLE_BATCH_PROCESSING else 1},
        "cache": {"size": (1000 if AGGRESSIVE_MEMORY_CLEANUP else 10000) if ENABLE_CACHING else 0},
    }
    if cfg.model.backend == "vllm":
        changes["vllm"] = {
            "enable_prefix_caching": ENABLE_CACHING,
            "gpu_memory_utilization": 0.80 if AGGRESSIVE_MEMORY_CLEANUP else 0.92,
            "quantization": "fp8" if ENABLE_QUANTIZATION else None,
            "max_num_seqs": 64 if ENABLE_BATCH_PROCESSING else 1,
        }
    return cfg.replace(**changes)


# %% The predict function: the model starts loading now, in the background
predict = make_predict(
    build_config(),
    total_budget_s=TOTAL_BUDGET_S,
    expected_problems=EXPECTED_PROBLEMS,
    results_path="aimo_results.jsonl",  # every answer also lands here, in case the notebook dies
)

# %% Serve the gateway (competition rerun) or try it on the test file
if __name__ == "__main__":
    try:
        import kaggle_evaluation.aimo_3_inference_server as aimo3

        server = aimo3.AIMO3InferenceServer(predict)
        if os.getenv("KAGGLE_IS_COMPETITION_RERUN"):
            server.serve()
        else:
            server.run_local_gateway((TEST_CSV,))
    except ImportError:  # not on Kaggle: the same calls, made the way the gateway makes them
        import polars as pl

        test = pl.read_csv(TEST_CSV)
        rows = [predict(*row) for row in test.iter_slices(n_rows=1)]
        submission = pl.concat(rows)
        submission.write_csv("submission.csv")
        print(submission)
    finally:
        predict.close()
