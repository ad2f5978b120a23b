"""Prefill speed: time to the first token of one long prompt through our engine vs one HF forward pass over
the same prompt at the same dtype (what a prompt costs HF ``generate`` before its first token)."""
from __future__ import annotations

import time

import torch


def long_prompt(tok, n: int) -> list[int]:
    """A chat-formatted prompt of exactly ``n`` tokens (ordinary English text, repeated)."""
    text = ("The engine schedules requests, runs the target model over paged key-value blocks, and verifies "
            "the drafter's proposals in one pass. ")
    body = tok(text * (n // 8 + 8), add_special_tokens=False)["input_ids"]
    head = tok.apply_chat_template([{"role": "user", "content": "Summarize:"}], add_generation_prompt=False)
    head = list(head["input_ids"] if hasattr(head, "keys") else head)
    return (head + body)[:n]


def ours(engine, prompt: list[int], runs: int = 2) -> float:
    """Median seconds from add_request to the first token (the whole prefill, chunked as the engine does)."""
    from workers.engine.params import SamplingParams, SpecParams

    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        engine.add_request(f"prefill-{len(prompt)}-{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                           SpecParams(enabled=False))
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def hf_forward(hf_model, prompt: list[int], runs: int = 2) -> float:
    ids = torch.tensor([prompt])
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            t0 = time.perf_counter()
            hf_model(input_ids=ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
