"""The plain script a user would write instead of the pipeline: the baseline of ``bench.backends``.

``python -m bench.plain_script INPUT.jsonl OUTPUT.jsonl --batch-size 32 --max-new-tokens 64``: load the
model with transformers, render each problem through the chat template, batched greedy ``generate``
with left padding, take the last number of each answer, write one JSON line per problem.
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import DEFAULT_SYSTEM_PROMPT
    from stages.backends.models import resolve_model

    folder, _ = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, args.dtype)).eval()
    with open(args.input, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(args.output, "w", encoding="utf-8") as out:
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i : i + args.batch_size]
            texts = [
                tok.apply_chat_template(
                    [
                        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                        {"role": "user", "content": r["problem"]},
                    ],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for r in chunk
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
            for r, ids in zip(chunk, gen[:, enc["input_ids"].shape[1] :], strict=True):
                text = str(tok.decode(ids, skip_special_tokens=True))
                numbers = re.findall(r"-?\d+", text.replace(",", ""))
                answer = int(numbers[-1]) if numbers else 0
                out.write(json.dumps({"id": r["id"], "answer": answer}) + "\n")


if __name__ == "__main__":
    main()
