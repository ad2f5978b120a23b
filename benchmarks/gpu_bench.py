"""Step-time benchmark of the engine's forward paths, eager vs graph, against the measured HBM roofline.

One command on a GPU machine (Qwen3-8B shape in bf16 with random weights, and the demo pair):
    python -m benchmarks.gpu_bench --out gpu_bench.json
CPU smoke (tiny shapes, seconds; checks the code paths, measures nothing meaningful):
    python -m benchmarks.gpu_bench --device cpu --smoke

Per case and batch size B (every sequence at --ctx cached tokens), for the eager runner and the graph runner:
  ar_ms      one AR decode step (B tokens) incl. input building and the host read of the argmax (= engine step)
  ar_fwd_ms  the same with the inputs already on the device (the forward + argmax alone)
  verify_ms  one verify step of --block tokens per sequence (drafter features captured)
  draft_ms   one drafter proposal (block of --block) + the context write of B*block committed rows
  roofline   (weights read once + KV read) / peak bandwidth; peak = a device-to-device copy on the same GPU
Spec projections use tau (tokens committed per target pass): measured end to end for the demo pair when its
real weights are there (--demo-target, --demo-drafter), else the --tau values given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from workers.engine.graph_runner import GraphRunner, reserve_scratch_block
from workers.engine.kv_cache import BlockManager, KVPool
from workers.engine.runner import ModelRunner, SeqSlice, build_draft_inputs, build_step_inputs

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, iters: int, warmup: int) -> float:
    """Median wall time of fn() in ms (fn ends with a host read, as an engine step does; we sync anyway)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def peak_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Bytes/s moved by a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, iters, warmup=3)
    return 2 * src.numel() * 2 / (ms / 1e3)


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight once; the embedding only as rows unless it is the tied head."""
    skip = set() if model.config.tie_word_embeddings else {id(model.model.embed_tokens.weight)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in skip:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def kv_bytes(layers: list[tuple[int, int]], elem: int, batch: int, ctx: int) -> int:
    return batch * ctx * sum(2 * h * d for h, d in layers) * elem


class Rig:
    """A model (+ drafter) with a KV pool holding `max_batch` sequences of `ctx` tokens, and both runners."""

    def __init__(self, model, drafter, device, dtype, max_batch: int, ctx: int, block: int, kv_block: int = 16):
        self.model, self.drafter, self.device, self.ctx, self.block, self.bs = model, drafter, device, ctx, block, kv_block
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.t_layers = [(l.self_attn.num_kv_heads, l.self_attn.head_dim) for l in model.model.layers]
        self.d_layers = [] if drafter is None else [
            (drafter.config.num_key_value_heads, drafter.config.head_dim)] * drafter.config.num_hidden_layers
        per_seq = -(-(ctx + block + 1) // kv_block)
        mgr = BlockManager(max_batch * per_seq + 1, kv_block)
        self.pool = KVPool(mgr.num_blocks, kv_block, self.t_layers, self.d_layers, dtype, device)
        scratch = reserve_scratch_block(mgr)
        self.tables = []
        for i in range(max_batch):
            mgr.reserve(str(i), ctx + block + 1)
            self.tables.append(list(mgr.ensure(str(i), ctx + block + 1)))
        self.eager = ModelRunner(model, drafter, self.pool, kv_block, device)
        self.graph = GraphRunner(model, drafter, self.pool, kv_block, device, scratch, max_num_seqs=max_batch,
                                 max_model_len=ctx + block + 1, mode="auto")
        fdim = 0 if drafter is None else drafter.fc.in_features
        self.feats = torch.randn(max_batch * block, max(fdim, 1), device=device).to(dtype)
        self.vocab = model.config.vocab_size

    def ar_inputs(self, b: int):
        sl = [SeqSlice([7 + i], self.ctx, self.tables[i], [0]) for i in range(b)]
        return build_step_inputs(sl, self.bs, self.device, capture=False)

    def ar(self, runner, b: int, inp=None):
        """One AR step; with ``inp`` given, the forward alone (inputs already built and on the device)."""
        logits, _ = runner.run_target(inp if inp is not None else self.ar_inputs(b))
        return logits.argmax(-1).tolist()

    def verify(self, runner, b: int):
        q = self.block
        sl = [SeqSlice([(7 + i + j) % self.vocab for j in range(q)], self.ctx, self.tables[i], list(range(q)))
              for i in range(b)]
        logits, _ = runner.run_target(build_step_inputs(sl, self.bs, self.device, capture=self.drafter is not None))
        return logits.argmax(-1).tolist()

    def draft(self, runner, b: int):
        d = build_draft_inputs([7 + i for i in range(b)], [self.ctx] * b, [self.block] * b, self.tables[:b],
                               self.drafter.config.mask_token_id, self.bs, self.device)
        out = runner.propose_logits(d).argmax(-1).tolist()
        rows = list(range(b * self.block))
        pos = [self.ctx + r % self.block for r in rows]
        slots = [self.tables[r // self.block][p // self.bs] * self.bs + p % self.bs for r, p in zip(rows, pos)]
        runner.write_context(self.feats, rows, pos, slots)
        return out

    def roofline_ms(self, b: int, bw: float) -> dict[str, float]:
        w = weight_bytes(self.model)
        ar = w + kv_bytes(self.t_layers, self.elem, b, self.ctx + 1)
        ver = w + kv_bytes(self.t_layers, self.elem, b, self.ctx + self.block)
        out = {"ar": ar / bw * 1e3, "verify": ver / bw * 1e3, "weights_gb": w / 1e9}
        if self.drafter is not None:
            dw = sum(p.numel() * p.element_size() for p in self.drafter.parameters())
            head = self.model.lm_head.weight.numel() * self.elem
            out["draft"] = (dw + head + kv_bytes(self.d_layers, self.elem, b, self.ctx)) / bw * 1e3
        return out


def bench_case(name: str, model, drafter, device, dtype, batches, ctx, block, iters, bw, taus, modes) -> list[dict]:
    rig = Rig(model, drafter, device, dtype, max(batches), ctx, block)
    rows = []
    for b in batches:
        roof = rig.roofline_ms(b, bw)
        for mode in modes:
            runner = rig.graph if mode == "graph" else rig.eager
            r = {"case": name, "batch": b, "mode": mode, "ctx": ctx, "block": block}
            r["ar_ms"] = timed_ms(lambda: rig.ar(runner, b), device, iters, 3)
            r["ar_tok_s"] = b / r["ar_ms"] * 1e3
            r["ar_roofline_ms"] = roof["ar"]
            r["ar_roofline_frac"] = roof["ar"] / r["ar_ms"]
            inp = rig.ar_inputs(b)
            r["ar_fwd_ms"] = timed_ms(lambda: rig.ar(runner, b, inp), device, iters, 3)
            r["ar_fwd_roofline_frac"] = roof["ar"] / r["ar_fwd_ms"]
            if drafter is not None:
                r["verify_ms"] = timed_ms(lambda: rig.verify(runner, b), device, iters, 3)
                r["draft_ms"] = timed_ms(lambda: rig.draft(runner, b), device, iters, 3)
                r["verify_over_ar"] = r["verify_ms"] / r["ar_ms"]
                r["draft_over_ar"] = r["draft_ms"] / r["ar_ms"]
                r["verify_roofline_frac"] = roof["verify"] / r["verify_ms"]
                spec_ms = r["verify_ms"] + r["draft_ms"]
                r["spec_projection"] = {str(t): {"tok_s": b * t / spec_ms * 1e3, "speedup": t * r["ar_ms"] / spec_ms}
                                        for t in taus}
            rows.append(r)
            print(_fmt(r), flush=True)
    if rig.graph.hits:
        print(f"  [{name}] graphs captured: {len(rig.graph.graphs)}, eager fallbacks: {rig.graph.fallbacks}")
    return rows


def _fmt(r: dict) -> str:
    s = (f"{r['case']:<10} B={r['batch']:<3} {r['mode']:<5} AR {r['ar_ms']:8.3f} ms ({r['ar_tok_s']:9.1f} tok/s, "
         f"{100 * r['ar_roofline_frac']:5.1f}% roofline; forward alone {r['ar_fwd_ms']:.3f} ms, "
         f"{100 * r['ar_fwd_roofline_frac']:5.1f}%)")
    if "verify_ms" in r:
        s += (f" | verify {r['verify_ms']:8.3f} ms ({r['verify_over_ar']:.2f}x AR) | draft {r['draft_ms']:8.3f} ms "
              f"({100 * r['draft_over_ar']:.1f}% AR)")
    return s


def e2e_tokens_per_s(target: str, drafter: str | None, device: str, dtype: str, concurrency: list[int],
                     max_tokens: int, graphs: bool, model=None, drafter_mod=None, tokenizer=None) -> list[dict]:
    """Real engine runs, greedy: AR vs DFlash tokens/s at each concurrency, and the measured tau."""
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import SamplingParams, SpecParams

    max_len = min(1024, (model.config if model is not None else None).max_position_embeddings) if model else 1024
    cfg = EngineConfig(model=target, drafter=drafter, device=device, dtype=dtype, max_num_seqs=max(concurrency),
                       max_model_len=max_len)
    eng = LLMEngine(cfg, model=model, drafter=drafter_mod, tokenizer=tokenizer)
    if graphs:
        eng.use_graphs()
    prompts = _prompts(eng, max(concurrency))
    out = []
    for c in concurrency:
        row = {"concurrency": c, "graphs": graphs}
        for label, spec in (("ar", SpecParams(enabled=False)), ("dflash", None)):
            for warm in (True, False):  # one untimed pass (captures graphs), then the timed one
                t0, n = time.perf_counter(), 0
                for i in range(c):
                    eng.add_request(f"{label}{c}{warm}{i}", prompts[i], SamplingParams(max_tokens=max_tokens), spec)
                while eng.has_unfinished():
                    n += sum(len(o.new_token_ids) for o in eng.step())
                dt = time.perf_counter() - t0
            row[f"{label}_tok_s"] = n / dt
        row["speedup"] = row["dflash_tok_s"] / row["ar_tok_s"]
        row["tau_mean"] = eng.stats().tau_mean
        out.append(row)
        print(f"  e2e concurrency {c}: AR {row['ar_tok_s']:.1f} tok/s, DFlash {row['dflash_tok_s']:.1f} tok/s "
              f"({row['speedup']:.2f}x, tau {row['tau_mean']})", flush=True)
    return out


def _prompts(eng, n: int) -> list[list[int]]:
    tok = eng.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        return [[(5 + 7 * i + j) % eng.model_config.vocab_size for j in range(12)] for i in range(n)]
    from workers.training.prompts import build_prompts

    texts = [p.text for p in build_prompts(20, 10) if p.split == "heldout"][:n]
    texts = (texts * (n // max(1, len(texts)) + 1))[:n]
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


def environment(device: torch.device) -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "device": str(device), "host": platform.node(),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # no NVML in this environment
            env["driver"] = f"unknown ({type(exc).__name__})"
    return env


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.gpu_cases import build_cases, check_goals

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU check of the code)")
    ap.add_argument("--cases", default="qwen3-8b,demo", help="comma list: qwen3-8b, qwen3-32b, demo")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--ctx", type=int, default=512, help="cached tokens per sequence")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--tau", default="3,4,5", help="tokens per target pass for the spec projections")
    ap.add_argument("--demo-target", default=None, help="SmolLM2 HF dir (default: the specfleet model cache)")
    ap.add_argument("--demo-drafter", default=str(REPO / "models" / "smollm2-135m-dflash-b16"))
    ap.add_argument("--e2e-concurrency", default="1,16")
    ap.add_argument("--e2e-max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --smoke for the CPU check")
    if a.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: a spinning thread pool only costs time on a shared box
    if a.smoke:
        a.batches, a.ctx, a.iters, a.block = ("1,4" if a.batches == "1,4,16,64" else a.batches), min(a.ctx, 48), \
            min(a.iters, 3), min(a.block, 8)
        a.e2e_concurrency, a.e2e_max_tokens = "1,4", min(a.e2e_max_tokens, 12)
    batches = [int(x) for x in a.batches.split(",")]
    taus = [float(x) for x in a.tau.split(",")]
    modes = a.modes.split(",")
    torch.manual_seed(0)
    res = {"env": environment(device), "args": vars(a)}
    bw = peak_bandwidth(device, (1 << 30) if device.type == "cuda" and not a.smoke else (64 << 20))
    res["peak_bw_gb_s"] = bw / 1e9
    print(f"{res['env']}\npeak copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    res["steps"], res["e2e"] = [], {}
    for case in build_cases(a, device):
        print(f"== {case.name}: {case.note}", flush=True)
        res["steps"] += bench_case(case.name, case.model, case.drafter, device, case.dtype, batches, a.ctx,
                                   a.block, a.iters, bw, taus, modes)
        if case.e2e is not None:
            res["e2e"][case.name] = [dict(r) for g in ([False, True] if "graph" in modes else [False])
                                     for r in e2e_tokens_per_s(**case.e2e, device=a.device, graphs=g,
                                                               concurrency=[int(x) for x in
                                                                            a.e2e_concurrency.split(",")],
                                                               max_tokens=a.e2e_max_tokens)]
        elif case.e2e_skip:
            res["e2e"][case.name] = {"skipped": case.e2e_skip}
            print(f"  e2e skipped: {case.e2e_skip}")
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["goals"] = check_goals(res)
    for g, v in res["goals"].items():
        print(f"goal {g}: {v}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
