"""`specfleet generate --model PATH [--drafter PATH] "prompt"`: stream one completion, print tokens/s and tau."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with the engine (AR or DFlash speculative)")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--model", required=True, help="HF model dir, .gguf file, or a cached model name (smollm2)")
    p.add_argument("--drafter", default=None, help="DFlash drafter dir (z-lab format); omit for plain AR")
    p.add_argument("--no-spec", action="store_true", help="decode autoregressively even with a drafter")
    p.add_argument("--block-size", type=int, default=None, help="drafted block size (<= the drafter's)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: on when the model has one, as "
                   "for an instruct model; --no-chat sends the prompt as raw text)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.set_defaults(func=run)


def resolve_model_path(model: str) -> str:
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    try:
        from workers import hub

        path = hub.model_dir(model)
    except Exception:
        path = None
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"model {model!r} is neither a path nor a cached model "
                                f"(try: specfleet models pull {model})")
    return str(path)


def use_chat(tokenizer, chat: bool | None) -> bool:
    """--chat / --no-chat, or by default whether the tokenizer has a chat template."""
    if chat is None:
        return bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; drop --chat")
    return chat


def summary(n_tokens: int, passes: int, decode_s: float, reason: str | None, mode: str, load_s: float) -> str:
    """The closing line. Decode speed and tau need two tokens or more (the first one comes from the prefill);
    with fewer they are shown as n/a, never as nan."""
    rate = f"{(n_tokens - 1) / decode_s:.1f} tok/s" if n_tokens > 1 and decode_s > 0 else "n/a tok/s"
    tau = f"{(n_tokens - 1) / passes:.2f}" if passes else "n/a"
    return (f"--- {n_tokens} tokens ({reason}); decode {rate}; tau {tau} tokens/target pass; {mode}; "
            f"load {load_s:.1f} s")


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer.encode(prompt)


def run(args: argparse.Namespace) -> int:
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import SamplingParams, SpecParams

    if args.drafter is not None and not Path(args.drafter).expanduser().is_dir():
        raise FileNotFoundError(f"drafter directory {args.drafter!r} does not exist")
    t_load = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=resolve_model_path(args.model), drafter=args.drafter, device=args.device,
                                 dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=1,
                                 seed=args.seed or 0))
    if eng.tokenizer is None:
        raise ValueError("this model has no tokenizer; generate needs one to encode the prompt")
    load_s = time.perf_counter() - t_load
    spec = None
    if args.no_spec or eng.proposer is None:
        spec = SpecParams(enabled=False)
    elif args.block_size is not None:
        spec = SpecParams(enabled=True, block_size=args.block_size)
    chat = use_chat(eng.tokenizer, args.chat)
    ids = encode_prompt(eng.tokenizer, args.prompt, chat)
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_tokens=min(args.max_tokens, eng.max_model_len - len(ids)), stop=tuple(args.stop),
                        seed=args.seed)
    eng.add_request("cli", ids, sp, spec)
    n_tokens, passes, reason, t0 = 0, 0, None, None
    while eng.has_unfinished():
        for out in eng.step():
            if t0 is None:  # time decoding from the first token on (prefill excluded)
                t0 = time.perf_counter()
            else:
                passes += 1
            n_tokens += len(out.new_token_ids)
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.error:
                print(f"\nerror: {out.error}", file=sys.stderr)
            reason = out.finish_reason or reason
    dt = time.perf_counter() - (t0 or time.perf_counter())
    mode = "AR" if (spec is not None and not spec.enabled) else f"DFlash block {spec.block_size if spec else eng.default_spec().block_size}"
    mode += "; chat template" if chat else "; raw prompt"
    print("\n" + summary(n_tokens, passes, dt, reason, mode, load_s), file=sys.stderr)
    return 0 if reason != "error" else 1
