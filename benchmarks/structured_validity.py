"""Structured outputs through the official openai SDK: `client.chat.completions.parse(response_format=<pydantic
model>)` on N requests over 12 schemas, served in-process by the real engine (the demo target, its DFlash
drafter, the real grammar path), and every finished output checked.

    python -m benchmarks.structured_validity [--per-schema 20] [--concurrency 16] [--max-tokens 256]
        [--spec on|off] [--dtype float32] [--threads 2] [--out runs/structured_validity.json]

For each request: the SDK's parse (a LengthFinishReasonError = the grammar could not finish within
max_tokens: counted as "length", never as valid or invalid), then an independent check of the content with
jsonschema against the schema the SDK sent. Reports: finished / length / errors, schema-valid share of the
finished outputs (the goal: 100 %), tokens, tau, wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

S = dict(max_length=60)


class Weather(BaseModel):
    city: str = Field(**S)
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=14)


class Person(BaseModel):
    name: str = Field(**S)
    age: int = Field(ge=0, le=120)
    email: str = Field(pattern=r"^[a-z0-9._]+@[a-z0-9]+\.[a-z]{2,4}$")


class Event(BaseModel):
    title: str = Field(**S)
    date: dt.date
    attendees: list[str] = Field(max_length=5)


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)


class Todo(BaseModel):
    task: str = Field(**S)
    done: bool


class TodoList(BaseModel):
    items: list[Todo] = Field(max_length=5)


class Address(BaseModel):
    street: str = Field(**S)
    city: str = Field(**S)
    zip: str = Field(pattern=r"^[0-9]{5}$")
    country: str = Field(**S)


class Classification(BaseModel):
    category: Literal["billing", "technical", "sales", "other"]
    tags: list[str] = Field(max_length=3)
    is_spam: bool


class Ingredient(BaseModel):
    name: str = Field(**S)
    grams: int = Field(ge=1, le=2000)


class Recipe(BaseModel):
    name: str = Field(**S)
    servings: int = Field(ge=1, le=12)
    ingredients: list[Ingredient] = Field(max_length=6)


class Filters(BaseModel):
    lang: Literal["en", "fr", "de", "es"]
    since_year: int = Field(ge=1990, le=2030)


class Search(BaseModel):
    query: str = Field(**S)
    filters: Filters
    limit: int = Field(ge=1, le=50)


class Circle(BaseModel):
    kind: Literal["circle"]
    radius: int = Field(ge=1, le=100)


class Square(BaseModel):
    kind: Literal["square"]
    side: int = Field(ge=1, le=100)


class Shape(BaseModel):
    shape: Union[Circle, Square] = Field(discriminator="kind")
    color: Literal["red", "green", "blue"]


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    would_recommend: bool
    summary: str = Field(**S)


class Book(BaseModel):
    title: str = Field(**S)
    isbn: Optional[str] = Field(None, pattern=r"^[0-9-]{10,17}$")
    year: Optional[int] = Field(None, ge=1400, le=2030)


SCHEMAS: list[tuple[type[BaseModel], list[str]]] = [
    (Weather, ["the weather in Paris for the next 3 days", "a forecast for Tokyo in fahrenheit for a week",
               "tomorrow's weather in Berlin", "the weather in Lima over the weekend"]),
    (Person, ["Alice Martin, 34, alice.martin@example.com", "a retired teacher named Bob, 67, bob@mail.org",
              "the new hire Chen Wei (29), chen.wei@corp.com", "my neighbour Sara, 41, sara@home.net"]),
    (Event, ["a team lunch on 2025-03-14 with Ana and Joe", "the product launch on 2024-11-02",
             "a dentist appointment on 2026-01-09", "Maria's birthday party on 2025-07-21 with four friends"]),
    (Sentiment, ["'I love this phone, the battery lasts forever'", "'the delivery was late and the box was broken'",
                 "'it is a chair'", "'best concert of my life'"]),
    (TodoList, ["buy milk, call mum (done), fix the bike", "today: write report, review PR, book flights",
                "clean the kitchen and water the plants", "finish taxes (done) and renew passport"]),
    (Address, ["10 Downing Street, London, 00001, UK", "1600 Amphitheatre Pkwy, Mountain View, 94043, USA",
               "5 Rue de Rivoli, Paris, 75001, France", "Unter den Linden 1, Berlin, 10117, Germany"]),
    (Classification, ["'my invoice is wrong, I was charged twice'", "'the app crashes when I log in'",
                      "'WIN A FREE CRUISE NOW!!!'", "'can I get a quote for 50 licences?'"]),
    (Recipe, ["pancakes for four", "a simple tomato pasta", "guacamole", "a green smoothie for one"]),
    (Search, ["recent French papers on speculative decoding", "English news about solar power since 2020",
              "German tutorials on Rust, 10 results", "Spanish recipes with rice from the last five years"]),
    (Shape, ["a red circle of radius 5", "a blue square with side 12", "a small green circle",
             "a big red square"]),
    (Book, ["'Dune' by Frank Herbert, 1965", "an unknown book called 'The Garden'",
            "'Neuromancer', ISBN 978-0-441-56959-5, 1984", "'Snow Crash' from 1992"]),
    (Rating, ["'meh'", "'absolutely terrible support, never again'", "'pretty good value for money'",
              "'the hotel was fine, nothing special'"]),
]
PHRASINGS = ["Extract the structured data from this: {}.", "Return JSON describing {}.",
             "Fill in the fields for {}.", "Give me {} as structured output.", "Describe {}."]


def requests(per_schema: int) -> list[tuple[type[BaseModel], str]]:
    out = []
    for model, subjects in SCHEMAS:
        texts = [p.format(s) for p in PHRASINGS for s in subjects]
        out += [(model, texts[i % len(texts)]) for i in range(per_schema)]
    return out


async def run(args) -> dict:
    import httpx
    import jsonschema
    import openai
    import torch
    from openai.lib._pydantic import to_strict_json_schema

    from benchmarks.structured_harness import inproc_server

    torch.set_num_threads(args.threads)
    app, core, load_s = inproc_server(spec=args.spec == "on", dtype=args.dtype, max_num_seqs=args.concurrency)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=3600)
    client = openai.AsyncOpenAI(api_key="key-a", base_url="http://bench/v1", http_client=http, max_retries=0)
    sem = asyncio.Semaphore(args.concurrency)
    rows = []

    async def one(model, text):
        async with sem:
            t0 = time.perf_counter()
            row = {"schema": model.__name__, "prompt": text}
            try:
                r = await client.chat.completions.parse(
                    model="specfleet-demo", messages=[{"role": "user", "content": text}], response_format=model,
                    max_tokens=args.max_tokens, extra_body={"spec": {"enabled": args.spec == "on"}})
                row.update(finish="stop", content=r.choices[0].message.content, tokens=r.usage.completion_tokens)
                problem = None
                try:
                    jsonschema.validate(json.loads(row["content"]), to_strict_json_schema(model))
                except (ValueError, jsonschema.ValidationError) as exc:
                    problem = str(exc)[:200]
                row["valid"] = problem is None and r.choices[0].message.parsed is not None
                row["problem"] = problem
            except openai.LengthFinishReasonError as exc:
                row.update(finish="length", tokens=exc.completion.usage.completion_tokens,
                           content=exc.completion.choices[0].message.content)
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                row.update(finish="error", error=f"{type(exc).__name__}: {exc}"[:300])
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)

    reqs = requests(args.per_schema)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(m, t) for m, t in reqs))
    wall = time.perf_counter() - t0
    stats = core.engine.stats()
    finished = [r for r in rows if r["finish"] == "stop"]
    by_schema = {}
    for r in rows:
        s = by_schema.setdefault(r["schema"], {"requests": 0, "finished": 0, "valid": 0, "length": 0, "errors": 0})
        s["requests"] += 1
        s["finished"] += r["finish"] == "stop"
        s["valid"] += bool(r.get("valid"))
        s["length"] += r["finish"] == "length"
        s["errors"] += r["finish"] == "error"
    core.engine._stop = True
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3], "args": vars(args), "model_load_s": load_s,
        "requests": len(rows), "schemas": len(by_schema), "finished": len(finished),
        "valid_of_finished": sum(bool(r.get("valid")) for r in finished),
        "length": sum(r["finish"] == "length" for r in rows), "errors": sum(r["finish"] == "error" for r in rows),
        "completion_tokens": sum(r.get("tokens") or 0 for r in rows), "wall_s": wall,
        "tau_by_constraint": stats.tau_by_tag.get("constrained"), "by_schema": by_schema,
        "invalid_examples": [r for r in finished if not r.get("valid")][:5],
        "error_examples": [r for r in rows if r["finish"] == "error"][:5], "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-schema", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--spec", choices=["on", "off"], default="on")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    summary = {k: v for k, v in res.items() if k not in ("rows",)}
    print(json.dumps(summary, indent=2, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
