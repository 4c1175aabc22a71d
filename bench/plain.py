"""The loop a user would write by hand: plain batched ``generate`` with no scheduler, no pipeline.

The benchmarks compare the pipeline against it. It lives here, not in the production backends:
it reaches into a backend's model (or script) directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from stages.backends.base import Backend, Completion
from stages.backends.fake import FakeBackend

_WORD = re.compile(r"\S+\s*|\s+")


def plain_generate(
    backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[Completion]:
    """Blocking, greedy: one left-padded ``model.generate`` over ``prompts`` (the scripted outputs for
    the fake backend).

    Raises:
        TypeError: ``backend`` is neither the transformers backend nor the fake.
    """
    if isinstance(backend, FakeBackend):
        if backend.delay_s:
            time.sleep(backend.delay_s)
        out = []
        for p in prompts:
            words = _WORD.findall(backend.script("".join(map(chr, p))))[:max_new_tokens]
            out.append(Completion(tuple(range(len(words))), "".join(words), "eos"))
        return out
    from stages.backends.transformers_backend import TransformersBackend, left_pad

    if not isinstance(backend, TransformersBackend):
        raise TypeError(
            f"the plain loop needs the transformers or the fake backend, not {type(backend).__name__}"
        )
    import torch

    ids, mask, width = left_pad(prompts, backend.pad_id)
    with torch.inference_mode():
        out_ids = backend.model.generate(
            input_ids=ids.to(backend.device),
            attention_mask=mask.to(backend.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=backend.pad_id,
            eos_token_id=sorted(backend.eos_ids),
        )
    rows = out_ids[:, width:].tolist()
    eos = backend.eos_ids
    return [backend.completion(r, "eos" if any(t in eos for t in r) else "length") for r in rows]
