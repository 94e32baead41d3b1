"""Request traces: the CSV format the simulator replays, and the bursty two-class sample it ships.

    arrival_s,slo_class,variant,shared_prefix,prompt_tokens,output_tokens
    0.013,interactive,llama-8b,sys-3,1210,143
    0.051,batch,llama-8b,none,3502,412

`shared_prefix` names a prefix shared by several requests (e.g. a system prompt)
or is `none`; its length is `PREFIX_FRACTION` of the shortest prompt that uses it.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HEADER = ("arrival_s", "slo_class", "variant", "shared_prefix", "prompt_tokens", "output_tokens")
PREFIX_FRACTION = 0.75


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file, the line and the field."""


@dataclass(frozen=True, slots=True)
class Request:
    arrival_s: float
    slo_class: str
    variant: str
    shared_prefix: str | None
    prompt_tokens: int
    output_tokens: int


def read_trace(path: str | Path) -> list[Request]:
    """Parse and check a trace CSV; arrivals must not go backwards."""
    path = Path(path)
    try:
        f = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror}") from None
    with f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise TraceError(f"{path}: empty file; expected the header {','.join(HEADER)}")
        if tuple(h.strip() for h in header) != HEADER:
            raise TraceError(f"{path}:1: header is {','.join(header)!r}; expected {','.join(HEADER)}")
        out: list[Request] = []
        last = 0.0
        for lineno, row in enumerate(rows, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(HEADER):
                raise TraceError(f"{path}:{lineno}: {len(row)} fields; expected {len(HEADER)} ({','.join(HEADER)})")
            req = _parse_row(path, lineno, row)
            if req.arrival_s < last:
                raise TraceError(f"{path}:{lineno}: arrival_s {req.arrival_s} is before the previous row's {last}; "
                                 "sort the trace by arrival")
            last = req.arrival_s
            out.append(req)
    if not out:
        raise TraceError(f"{path}: no requests after the header")
    return out


def _parse_row(path: Path, lineno: int, row: list[str]) -> Request:
    arrival, slo, variant, prefix, prompt, output = (c.strip() for c in row)

    def number(name: str, text: str, kind: type[int] | type[float], low: float) -> float:
        try:
            value: float = kind(text)
        except ValueError:
            raise TraceError(f"{path}:{lineno}: {name} {text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value) or value < low:
            raise TraceError(f"{path}:{lineno}: {name} {text!r} must be >= {low:g}")
        return value

    for name, text in (("slo_class", slo), ("variant", variant), ("shared_prefix", prefix)):
        if not text:
            raise TraceError(f"{path}:{lineno}: {name} is empty" + (" (write 'none')" if name == "shared_prefix" else ""))
    return Request(
        arrival_s=number("arrival_s", arrival, float, 0.0),
        slo_class=slo,
        variant=variant,
        shared_prefix=None if prefix == "none" else prefix,
        prompt_tokens=int(number("prompt_tokens", prompt, int, 1)),
        output_tokens=int(number("output_tokens", output, int, 1)),
    )


def write_trace(path: str | Path, requests: Iterable[Request]) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for r in requests:
            w.writerow((f"{r.arrival_s:.3f}", r.slo_class, r.variant, r.shared_prefix or "none",
                        r.prompt_tokens, r.output_tokens))


def prefix_lengths(requests: Iterable[Request]) -> dict[str, int]:
    """Tokens each shared prefix covers: PREFIX_FRACTION of its shortest prompt."""
    shortest: dict[str, int] = {}
    for r in requests:
        if r.shared_prefix is not None:
            shortest[r.shared_prefix] = min(shortest.get(r.shared_prefix, r.prompt_tokens), r.prompt_tokens)
    return {p: int(n * PREFIX_FRACTION) for p, n in shortest.items()}


@dataclass(frozen=True)
class SampleShape:
    """The sample trace: a daily-like swell with bursts of interactive traffic, steady batch work."""

    duration_s: float = 1800.0
    interactive_rps: float = 60.0  # base rate; the swell and bursts multiply it
    batch_rps: float = 15.0
    swell: float = 0.5  # +-50% over the trace (one slow cycle)
    bursts: int = 4  # interactive bursts: up to burst_factor x over ramp_s, held, back down over ramp_s
    burst_factor: float = 2.0
    burst_s: float = 240.0
    ramp_s: float = 60.0
    variant: str = "llama-8b"
    system_prompts: int = 8  # interactive requests share one of these prefixes (70% of them)


def sample_trace(seed: int = 0, shape: SampleShape = SampleShape()) -> list[Request]:
    """A reproducible bursty two-class trace (same seed -> same rows)."""
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0.1, 0.85) * shape.duration_s for _ in range(shape.bursts))

    def rate(cls: str, t: float) -> float:
        swell = 1 + shape.swell * math.sin(2 * math.pi * t / shape.duration_s - math.pi / 2)
        if cls == "batch":
            return shape.batch_rps * swell
        level = max((min(1.0, (t - s) / shape.ramp_s, (s + shape.burst_s - t) / shape.ramp_s)
                     for s in starts if s <= t < s + shape.burst_s), default=0.0)
        return shape.interactive_rps * swell * (1 + (shape.burst_factor - 1) * level)

    peak = {c: rate(c, 0) for c in ("interactive", "batch")}
    peak["interactive"] = shape.interactive_rps * (1 + shape.swell) * shape.burst_factor
    peak["batch"] = shape.batch_rps * (1 + shape.swell)
    out: list[Request] = []
    for cls in ("interactive", "batch"):
        t = 0.0
        while True:  # thinning of a Poisson process with the time-varying rate
            t += rng.expovariate(peak[cls])
            if t >= shape.duration_s:
                break
            if rng.random() * peak[cls] > rate(cls, t):
                continue
            if cls == "interactive":
                shared = rng.random() < 0.7
                prefix = f"sys-{rng.randrange(shape.system_prompts)}" if shared else None
                prompt = int(min(8000, rng.lognormvariate(math.log(900), 0.6))) + (600 if shared else 0)
                output = int(min(1500, rng.lognormvariate(math.log(180), 0.7))) + 1
            else:
                prefix = None
                prompt = int(min(16000, rng.lognormvariate(math.log(2500), 0.8)))
                output = int(min(2000, rng.lognormvariate(math.log(350), 0.6))) + 1
            out.append(Request(round(t, 3), cls, shape.variant, prefix, max(1, prompt), output))
    out.sort(key=lambda r: r.arrival_s)
    return out
