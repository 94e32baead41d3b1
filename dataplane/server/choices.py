"""Several `Generation`s (a batch of prompts, each with n choices) as one stream of pieces.

`merged()` runs the generations concurrently and yields `(generation index, piece)`
in arrival order; leaving the loop early (an error, a client that went away) stops
every generation, which frees their engine requests. `collect()` gathers each
choice's text and logprobs for a non-streaming response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from kvfleet.dataplane.engine.api import TokenLogprob
from kvfleet.dataplane.server.generation import Generation, Piece


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


async def merged(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Piece]]:
    """(index into gens, piece) as they come; the first error from any generation is raised."""
    if len(gens) == 1:
        async with aclosing(gens[0].pieces()) as pieces:
            async for piece in pieces:
                yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, Piece] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async with aclosing(gen.pieces()) as pieces:
                async for piece in pieces:
                    queue.put_nowait((i, piece))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(e)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(gens: Sequence[Generation], n: int) -> list[list[ChoiceResult]]:
    """Per generation, per choice: the whole text, tokens, logprobs and finish reason."""
    out = [[ChoiceResult() for _ in range(n)] for _ in gens]
    texts: dict[tuple[int, int], list[str]] = {}
    async with aclosing(merged(gens)) as pieces:
        async for g, piece in pieces:
            r = out[g][piece.index]
            texts.setdefault((g, piece.index), []).append(piece.text)
            r.token_ids += piece.token_ids
            r.logprobs += piece.logprobs
            if piece.finish_reason is not None:
                r.finish_reason = piece.finish_reason
    for (g, i), parts in texts.items():
        out[g][i].text = "".join(parts)
    return out
