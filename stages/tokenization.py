"""The tokenize stage: a problem through the prompt style and the chat template into token ids.

A prompt it cannot encode, or one too long for the model, ends there: its error result goes straight
to the router (``failed``), routed to its job, past the stages that would only pass it on."""

from __future__ import annotations

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stages.backends.base import Backend
from stages.clock import now
from stages.config import Config
from stages.items import Encoded, Job, Result, Routed, error_result
from stages.prompting import messages_for as messages_for
from stages.prompting import style_for
from stages.streams import batches, put


def encode(job: Job, backend: Backend, cfg: Config) -> Encoded | Result:
    """Tokenize one problem; a prompt that leaves no room to answer becomes an error result."""
    start = now()
    problem = job.problem
    try:
        ids = style_for(cfg.generation.prompt_style).prompt_ids(problem.text, cfg, backend)
    except Exception as e:  # a tokenizer failure is this problem's, not the run's
        return error_result(
            problem.id,
            f"cannot tokenize the problem: {e}",
            line=problem.line,
            gold=problem.answer,
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
        )
    return Encoded(job=job, prompt_ids=tuple(ids), tokenize_s=now() - start)


async def run(
    receive: MemoryObjectReceiveStream[Job],
    send: MemoryObjectSendStream[Encoded],
    backend: Backend,
    cfg: Config,
    failed: MemoryObjectSendStream[Routed],
) -> None:
    """Encode each job in arrival order (a fast tokenizer takes well under a millisecond a prompt);
    a job that cannot be encoded sends its error result to ``failed``."""
    async with receive, send, failed:
        async for jobs in batches(receive):
            for job in jobs:
                out = encode(job, backend, cfg)
                if isinstance(out, Result):
                    await put(failed, Routed(out, job.key, job.serial))
                else:
                    await put(send, out)
