"""A diverse prompt set the project generates itself (no hub datasets): math, code, chat.

Deterministic for a given seed (and Python version, for the stdlib-derived coding tasks). Each category has its
own held-out split, used by benchmarks/acceptance.py and never trained on.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
from dataclasses import asdict, dataclass

CATEGORIES = ("math", "code", "chat")


@dataclass(frozen=True)
class Prompt:
    id: str  # stable: category + hash of the text
    category: str  # math | code | chat
    text: str
    split: str  # train | heldout

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- math
NAMES = ["Ava", "Liam", "Noah", "Mia", "Sofia", "Ethan", "Priya", "Kenji", "Amara", "Lucas", "Zara", "Omar",
         "Elena", "Mateo", "Chloe", "Ravi", "Hana", "Diego", "Fatima", "Jonas", "Grace", "Yusuf", "Nora", "Leo"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps", "oranges", "toy cars",
         "cupcakes", "shells", "coins", "flowers", "balloons", "notebooks"]
PLACES = ["the store", "the market", "the bakery", "the school fair", "the library sale", "a garage sale"]
MATH_TEMPLATES = [
    "{a} has {x} {item}. {b} gives {a} {y} more. How many {item} does {a} have now?",
    "{a} had {x} {item} and gave {y} of them to {b}. How many {item} does {a} have left?",
    "{a} buys {x} packs of {item} at {place}. Each pack has {y} {item}. How many {item} does {a} buy in total?",
    "{a} wants to share {xy} {item} equally among {y} friends. How many {item} does each friend get?",
    "A box holds {y} {item}. {a} has {xy} {item}. How many boxes does {a} need?",
    "{a} earns ${x} per hour and works {y} hours a week. How much does {a} earn in {z} weeks?",
    "A shirt costs ${x}. It is on sale for {p}% off. What is the sale price?",
    "{a} reads {x} pages a day. The book has {xy} pages. How many days will it take to finish the book?",
    "A train travels at {x} miles per hour for {y} hours. How far does it travel?",
    "{a} has ${x}. {a} spends ${y} at {place} and then earns ${z}. How much money does {a} have now?",
    "The sum of two numbers is {s} and their difference is {d}. What are the two numbers?",
    "{a} is {x} years old. {b} is {y} years older than {a}. How old will {b} be in {z} years?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and its perimeter?",
    "{a} scored {x}, {y} and {z} points in three games. What is the average score?",
    "There are {x} students in a class. {p}% of them walk to school. How many students walk to school?",
    "{a} bakes {x} {item} and sells {y} of them for ${z} each. How much money does {a} make, and how many are left?",
    "Solve for x: {y}x + {z} = {w}.",
    "What is {x} times {y} plus {z}?",
    "A recipe needs {y} cups of flour for {z} {item}. How many cups are needed for {yz2} {item}?",
    "{a} saves ${y} every week. How many weeks does it take to save ${xy}?",
    "A tank holds {xy} liters and drains {y} liters per minute. How long until it is empty?",
    "{a} and {b} have {s} {item} together. {a} has {d} more than {b}. How many does each have?",
]
MATH_STYLES = ["", "Explain your reasoning step by step. ", "Show your work. ", "Answer briefly. ",
               "Think carefully and give the final answer at the end. "]


def _math_prompt(rng: random.Random) -> str:
    x, y, z = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 9)
    a, b = rng.sample(NAMES, 2)
    s = rng.randint(20, 120)
    d = rng.randrange(2, s, 2) if s % 2 == 0 else rng.randrange(1, s, 2)
    vals = dict(a=a, b=b, x=x, y=y, z=z, xy=x * y, yz2=z * rng.randint(2, 5), p=rng.choice([10, 15, 20, 25, 30, 40, 50]),
                s=s, d=d, w=y * rng.randint(1, 20) + z, item=rng.choice(ITEMS), place=rng.choice(PLACES))
    text = rng.choice(MATH_TEMPLATES).format(**vals)
    style = rng.choice(MATH_STYLES)
    return f"{style}{text}" if rng.random() < 0.5 else f"{text} {style}".strip()


# ---------------------------------------------------------------------------------------------- code
STDLIB_MODULES = ["string", "textwrap", "itertools", "functools", "collections", "math", "statistics", "heapq",
                  "bisect", "json", "re", "os.path", "shutil", "random", "fractions", "datetime", "calendar",
                  "operator", "difflib", "html", "base64", "hashlib", "glob", "fnmatch", "copy", "zlib", "csv"]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a string", "removes duplicates from a list while keeping the order",
    "merges two sorted lists", "flattens a nested list", "finds the largest element of a list without max()",
    "checks whether a string is a palindrome", "computes the factorial of n recursively",
    "converts Celsius to Fahrenheit", "returns the most common word in a text", "sorts a list of dictionaries by a key",
    "computes the greatest common divisor of two numbers", "checks whether two strings are anagrams",
    "implements binary search", "implements bubble sort", "reads a CSV file and returns the rows as dictionaries",
    "counts the lines in a file", "validates an email address with a regular expression",
    "returns the second largest number in a list", "transposes a matrix given as a list of lists",
    "chunks a list into pieces of size n", "computes the running average of a list",
    "converts a Roman numeral to an integer", "capitalizes the first letter of every word",
    "implements a stack class with push, pop and peek", "implements a queue using two stacks",
    "finds all pairs in a list that sum to a target", "computes the power set of a list",
]
CODE_LANG_STYLES = ["Write a Python function that {t}.", "Write a short Python function that {t}. Add a docstring.",
                    "How do I write a Python function that {t}?", "Implement a Python function that {t}, with an example.",
                    "Give me Python code that {t}, and explain it briefly."]


def _stdlib_functions() -> list[tuple[str, str, str]]:
    """(qualified name, signature, first docstring line) of public stdlib functions with a signature."""
    out = []
    for mod_name in STDLIB_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            try:
                sig = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))  # no memory addresses
            except (TypeError, ValueError):
                continue
            if doc and 10 < len(doc[0]) < 160:
                out.append((f"{mod_name}.{name}", sig, doc[0].rstrip(".")))
    return out


def _code_prompt(rng: random.Random, funcs: list[tuple[str, str, str]]) -> str:
    kind = rng.random()
    if kind < 0.45 and funcs:
        qual, sig, doc = rng.choice(funcs)
        short = qual.rsplit(".", 1)[-1]
        return rng.choice([
            f"Write a Python function `{short}{sig}` from scratch that does the following: {doc}.",
            f"Explain what `{qual}{sig}` does in Python and show a short usage example.",
            f"What does the Python function `{qual}` do? Its documentation says: \"{doc}\". Give an example.",
            f"Reimplement `{qual}` in plain Python without importing it. It should: {doc}.",
        ])
    return rng.choice(CODE_LANG_STYLES).format(t=rng.choice(CODE_TASKS))


# ---------------------------------------------------------------------------------------------- chat
TOPICS = ["photosynthesis", "black holes", "the water cycle", "machine learning", "the French Revolution",
          "climate change", "the immune system", "volcanoes", "inflation", "the internet", "vaccines",
          "renewable energy", "the Roman Empire", "DNA", "gravity", "the stock market", "sleep", "coffee",
          "electric cars", "the moon landing", "honey bees", "rainbows", "earthquakes", "the printing press"]
ACTIVITIES = ["learning a new language", "staying productive at home", "starting to run", "saving money",
              "sleeping better", "cooking healthy meals", "preparing for a job interview", "reducing stress",
              "learning to play guitar", "traveling on a budget", "keeping a houseplant alive", "public speaking"]
PAIRS = [("a virus", "a bacterium"), ("weather", "climate"), ("a list", "a tuple"), ("speed", "velocity"),
         ("a crocodile", "an alligator"), ("RAM", "storage"), ("a democracy", "a republic"), ("tea", "coffee")]
CHAT_TEMPLATES = [
    "Explain {topic} in simple terms.", "Can you explain {topic} to a ten-year-old?",
    "Give me {n} tips for {activity}.", "What are the main benefits of {activity}?",
    "Write a short poem about {topic}.", "What is the difference between {p} and {q}?",
    "Write a polite email to my {who} asking for {ask}.", "Summarize the history of {topic} in a few sentences.",
    "What are {n} interesting facts about {topic}?", "Write a short story about a {animal} who {does}.",
    "I am feeling {mood} today. Any advice?", "Describe {topic} in one paragraph.",
    "List {n} pros and cons of {activity}.", "Write a haiku about {topic}.",
    "How does {topic} affect everyday life?", "Suggest a weekend plan for someone interested in {activity}.",
]
WHO = ["manager", "teacher", "landlord", "neighbor", "colleague"]
ASK = ["a day off", "feedback on my project", "help with a repair", "a meeting next week", "an extension"]
ANIMALS = ["cat", "fox", "robot", "dragon", "penguin", "owl"]
DOES = ["learns to fly", "finds a lost key", "opens a bakery", "travels to the moon", "makes a new friend"]
MOODS = ["tired", "stressed", "bored", "anxious", "unmotivated", "happy"]


CHAT_STYLES = ["", "", "Please keep it short.", "Use bullet points.", "Be friendly and clear.",
               "Answer in two or three sentences.", "Make it fun.", "Be detailed."]


def _chat_prompt(rng: random.Random) -> str:
    p, q = rng.choice(PAIRS)
    style = rng.choice(CHAT_STYLES)
    return (rng.choice(CHAT_TEMPLATES) + (" " + style if style else "")).format(
        topic=rng.choice(TOPICS), activity=rng.choice(ACTIVITIES), n=rng.randint(3, 7), p=p, q=q,
        who=rng.choice(WHO), ask=rng.choice(ASK), animal=rng.choice(ANIMALS), does=rng.choice(DOES),
        mood=rng.choice(MOODS))


# ------------------------------------------------------------------------------------------- builder
def build_prompts(n_per_category: int = 300, n_heldout: int = 20, seed: int = 0,
                  categories: tuple[str, ...] = CATEGORIES) -> list[Prompt]:
    """``n_per_category`` distinct prompts per category; the first ``n_heldout`` of each are held out."""
    if n_heldout >= n_per_category:
        raise ValueError("n_heldout must be smaller than n_per_category")
    funcs = _stdlib_functions() if "code" in categories else []
    out: list[Prompt] = []
    for cat in categories:
        if cat not in CATEGORIES:
            raise ValueError(f"unknown prompt category {cat!r}; known: {CATEGORIES}")
        rng = random.Random(f"{seed}:{cat}")
        seen: set[str] = set()
        tries = 0
        while len(seen) < n_per_category:
            tries += 1
            if tries > 50 * n_per_category:
                raise ValueError(f"cannot make {n_per_category} distinct {cat} prompts")
            text = _math_prompt(rng) if cat == "math" else _code_prompt(rng, funcs) if cat == "code" else _chat_prompt(rng)
            if text in seen:
                continue
            seen.add(text)
            pid = f"{cat}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
            out.append(Prompt(pid, cat, text, "heldout" if len(seen) <= n_heldout else "train"))
    return out
