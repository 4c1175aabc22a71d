"""The tokenize stage: a problem through the prompt style and the chat template into token ids."""

from __future__ import annotations

import time

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stages.backends.base import Backend
from stages.config import Config
from stages.items import Encoded, Job, Result, error_result
from stages.prompting import style_for


def messages_for(text: str, cfg: Config) -> list[dict[str, str]]:
    """The chat messages for a problem under the configured prompt style (its own system prompt unless
    ``generation.system_prompt`` is set)."""
    system = cfg.generation.system_prompt or style_for(cfg.generation.prompt_style).system_prompt
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": text.strip()},
    ]


def encode(job: Job, backend: Backend, cfg: Config) -> Encoded | Result:
    """Tokenize one problem; a prompt that leaves no room to answer becomes an error result."""
    start = time.perf_counter()
    problem = job.problem
    try:
        ids = backend.encode(messages_for(problem.text, cfg))
    except Exception as e:  # a tokenizer failure is this problem's, not the run's
        return error_result(
            problem.id,
            f"cannot tokenize the problem: {e}",
            line=problem.line,
            gold=problem.answer,
            key=job.key,
            serial=job.serial,
        )
    budget = backend.max_context - cfg.generation.max_new_tokens
    if len(ids) > budget:
        where = f"line {problem.line}: " if problem.line is not None else ""
        return error_result(
            problem.id,
            f"{where}the prompt is {len(ids)} tokens; with max_new_tokens={cfg.generation.max_new_tokens} "
            f"it exceeds the model's context of {backend.max_context} tokens",
            line=problem.line,
            gold=problem.answer,
            key=job.key,
            serial=job.serial,
        )
    return Encoded(job=job, prompt_ids=tuple(ids), tokenize_s=time.perf_counter() - start)


async def run(
    receive: MemoryObjectReceiveStream[Job],
    send: MemoryObjectSendStream[Encoded | Result],
    backend: Backend,
    cfg: Config,
) -> None:
    """Encode each job in arrival order (a fast tokenizer takes well under a millisecond a prompt)."""
    async with receive, send:
        async for job in receive:
            await send.send(encode(job, backend, cfg))
