"""The prompt set the project generates itself (no hub datasets): math, code, chat and the agent roles.

A ``Conversation`` is what a client sends, turn by turn: an optional system prompt and one or more user turns.
The target answers every turn; turn k's prompt is the conversation so far (system, user 1, the target's answer
1, ..., user k), exactly as an agent framework resends it through the chat API. Single-turn categories (math,
code, chat) get an occasional follow-up; the agent roles (planner, coder, reviewer, tool_caller: the roles of
benchmarks/workload.py, with its system prompts) run 1-4 turns.

Deterministic for a given seed (and Python version, for the stdlib-derived coding tasks). Each category has its
own held-out split (the first ``n_heldout`` conversations), never trained on: benchmarks/acceptance.py and the
trainer's periodic tau use it.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
from dataclasses import dataclass

CATEGORIES = ("math", "code", "chat", "planner", "coder", "reviewer", "tool_caller")
AGENT_ROLES = ("planner", "coder", "reviewer", "tool_caller")

# The agent roles' system prompts (benchmarks/workload.py sends these same ones).
AGENT_SYSTEM = {
    "planner": "You are the planner of a small software team. Break the task into short numbered steps. "
               "Be brief.",
    "coder": "You are an expert Python programmer. Reply with a single Python code block and nothing else.",
    "reviewer": "You are a strict code reviewer. List concrete problems in the code as short bullet points.",
    "tool_caller": "You are an agent that calls tools. Reply with exactly one JSON object of the form "
                   '{"tool": <name>, "arguments": {...}} and nothing else.',
}


@dataclass(frozen=True)
class Conversation:
    id: str  # stable: category + hash of the content
    category: str  # one of CATEGORIES
    system: str | None  # None: the chat template's default system prompt
    turns: tuple[str, ...]  # user messages; the target answers each one
    split: str  # train | heldout

    @property
    def text(self) -> str:
        """The first user turn (single-prompt callers: engine benchmarks)."""
        return self.turns[0]

    def messages(self, answers: list[str]) -> list[dict[str, str]]:
        """Chat messages for turn ``len(answers)``: system, then user / assistant pairs, ending on a user turn."""
        k = len(answers)
        if k >= len(self.turns):
            raise ValueError(f"conversation {self.id} has {len(self.turns)} turns; no turn {k}")
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, answer in zip(self.turns[:k], answers):
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": self.turns[k]}]


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` + the generation prompt, exactly as the OpenAI-compatible API encodes them."""
    if not getattr(tokenizer, "chat_template", None):  # a base model / test tokenizer: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------- math
NAMES = ["Ava", "Liam", "Noah", "Mia", "Sofia", "Ethan", "Priya", "Kenji", "Amara", "Lucas", "Zara", "Omar",
         "Elena", "Mateo", "Chloe", "Ravi", "Hana", "Diego", "Fatima", "Jonas", "Grace", "Yusuf", "Nora", "Leo",
         "Ines", "Tariq", "Maya", "Felix", "Aisha", "Hugo", "Lina", "Samir", "Julia", "Kofi", "Mei", "Arjun"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps", "oranges", "toy cars",
         "cupcakes", "shells", "coins", "flowers", "balloons", "notebooks", "muffins", "crayons", "beads",
         "postcards", "lemons", "tickets", "puzzles", "candles"]
PLACES = ["the store", "the market", "the bakery", "the school fair", "the library sale", "a garage sale",
          "the farm stand", "the bookshop", "the toy shop", "the flea market"]
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
    "What is {p}% of {xy}?",
    "A car uses {y} liters of fuel per 100 km. How much fuel does it need for {x}00 km?",
    "{a} runs {y} km every day for {z} weeks. How many kilometers is that in total?",
    "A square has a perimeter of {y4} cm. What is its area?",
    "The price of a bike rose from ${x}0 to ${x2}0. By what percent did the price increase?",
    "{a} has {x} red and {y} blue {item}. What fraction of the {item} are blue?",
    "Compute {x}^2 - {y}^2 and check your answer by factoring.",
    "A movie starts at {h}:{m:02d} and lasts {y}0 minutes. When does it end?",
    "Is {n} a prime number? Explain how you know.",
    "Find the least common multiple of {y} and {z}.",
    "{a} walks {y} km in {z} hours. At the same speed, how far does {a} walk in {zz} hours?",
    "A class of {x} students splits into groups of {y}. How many full groups are there and how many students "
    "are left over?",
]
MATH_STYLES = ["", "Explain your reasoning step by step. ", "Show your work. ", "Answer briefly. ",
               "Think carefully and give the final answer at the end. ", "Solve this problem. "]
MATH_FOLLOW_UPS = ["Can you check the answer another way?", "Explain the second step in more detail.",
                   "What if the numbers were doubled?", "Write the answer as a single equation.",
                   "Is there a faster way to solve it?"]


def _math_prompt(rng: random.Random) -> str:
    x, y, z = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 9)
    a, b = rng.sample(NAMES, 2)
    s = rng.randint(20, 120)
    d = rng.randrange(2, s, 2) if s % 2 == 0 else rng.randrange(1, s, 2)
    vals = dict(a=a, b=b, x=x, y=y, z=z, xy=x * y, yz2=z * rng.randint(2, 5), p=rng.choice([5, 10, 15, 20, 25, 30,
                40, 50, 75]), s=s, d=d, w=y * rng.randint(1, 20) + z, item=rng.choice(ITEMS), place=rng.choice(PLACES),
                y4=4 * y, x2=x + rng.randint(1, 30), h=rng.randint(1, 11), m=rng.choice(range(0, 60, 5)),
                n=rng.choice([rng.randint(10, 200), rng.choice([17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67,
                                                                 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113])]),
                zz=z + rng.randint(1, 5))
    text = rng.choice(MATH_TEMPLATES).format(**vals)
    style = rng.choice(MATH_STYLES)
    return f"{style}{text}" if rng.random() < 0.5 else f"{text} {style}".strip()


# ---------------------------------------------------------------------------------------------- code
STDLIB_MODULES = ["string", "textwrap", "itertools", "functools", "collections", "math", "statistics", "heapq",
                  "bisect", "json", "re", "os.path", "shutil", "random", "fractions", "datetime", "calendar",
                  "operator", "difflib", "html", "base64", "hashlib", "glob", "fnmatch", "copy", "zlib", "csv",
                  "urllib.parse", "ipaddress", "uuid", "secrets", "pathlib", "decimal", "unicodedata"]
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
    "converts an integer to binary without bin()", "rotates a list by k positions", "checks balanced parentheses",
    "computes the edit distance between two strings", "implements insertion sort", "implements merge sort",
    "implements quicksort", "finds the longest common prefix of a list of strings", "counts words in a sentence",
    "checks whether a year is a leap year", "generates all permutations of a string",
    "returns the prime factors of a number", "computes the sum of the digits of a number",
    "finds the missing number in a list from 1 to n", "groups a list of words by their first letter",
    "parses a date string in YYYY-MM-DD format", "implements a linked list with append and find",
    "computes the dot product of two vectors", "converts a dictionary to a JSON string and back",
    "finds the intersection of two lists", "returns the n largest values of a list with heapq",
    "implements a simple LRU cache with OrderedDict", "compresses a string with run-length encoding",
    "checks whether a number is a perfect square", "finds the mode of a list of numbers",
]
CODE_LANG_STYLES = ["Write a Python function that {t}.", "Write a short Python function that {t}. Add a docstring.",
                    "How do I write a Python function that {t}?", "Implement a Python function that {t}, with an example.",
                    "Give me Python code that {t}, and explain it briefly.", "Write Python that {t}. Keep it simple.",
                    "Can you show me a Python function that {t}?"]
CODE_FOLLOW_UPS = ["Add type hints.", "Now write a test for it.", "What is its time complexity?",
                   "Can you make it shorter?", "Handle the empty input case too.", "Explain the code line by line."]


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
    if rng.random() < 0.45 and funcs:
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
          "electric cars", "the moon landing", "honey bees", "rainbows", "earthquakes", "the printing press",
          "the solar system", "ancient Egypt", "the human heart", "tides", "recycling", "jazz music", "chess",
          "the Olympic Games", "bread baking", "the Great Wall of China", "plate tectonics", "dinosaurs",
          "the Renaissance", "compound interest", "meditation", "coral reefs", "the piano", "democracy",
          "the speed of light", "penguins", "cloud computing", "the Silk Road", "volunteering", "tea ceremonies"]
ACTIVITIES = ["learning a new language", "staying productive at home", "starting to run", "saving money",
              "sleeping better", "cooking healthy meals", "preparing for a job interview", "reducing stress",
              "learning to play guitar", "traveling on a budget", "keeping a houseplant alive", "public speaking",
              "writing a novel", "learning to swim", "starting a small business", "making friends in a new city",
              "studying for exams", "drinking more water", "learning to draw", "organizing a closet",
              "planning a wedding", "adopting a dog", "gardening on a balcony", "learning to code"]
PAIRS = [("a virus", "a bacterium"), ("weather", "climate"), ("a list", "a tuple"), ("speed", "velocity"),
         ("a crocodile", "an alligator"), ("RAM", "storage"), ("a democracy", "a republic"), ("tea", "coffee"),
         ("a comet", "an asteroid"), ("a frog", "a toad"), ("mass", "weight"), ("a lake", "a pond"),
         ("an ocean", "a sea"), ("a simile", "a metaphor"), ("HTTP", "HTTPS"), ("a hurricane", "a tornado")]
CHAT_TEMPLATES = [
    "Explain {topic} in simple terms.", "Can you explain {topic} to a ten-year-old?",
    "Give me {n} tips for {activity}.", "What are the main benefits of {activity}?",
    "Write a short poem about {topic}.", "What is the difference between {p} and {q}?",
    "Write a polite email to my {who} asking for {ask}.", "Summarize the history of {topic} in a few sentences.",
    "What are {n} interesting facts about {topic}?", "Write a short story about a {animal} who {does}.",
    "I am feeling {mood} today. Any advice?", "Describe {topic} in one paragraph.",
    "List {n} pros and cons of {activity}.", "Write a haiku about {topic}.",
    "How does {topic} affect everyday life?", "Suggest a weekend plan for someone interested in {activity}.",
    "Why is {topic} important?", "Give me a quiz with {n} questions about {topic}.",
    "What should a beginner know about {activity}?", "Write a limerick about a {animal}.",
    "Tell me a fun fact about {topic} and explain it.", "What are common mistakes people make when {activity}?",
    "Write a thank-you note to my {who}.", "Make a packing list for a trip to {city}.",
]
WHO = ["manager", "teacher", "landlord", "neighbor", "colleague", "coach", "aunt", "doctor", "friend"]
ASK = ["a day off", "feedback on my project", "help with a repair", "a meeting next week", "an extension",
       "a letter of recommendation", "a quieter evening"]
ANIMALS = ["cat", "fox", "robot", "dragon", "penguin", "owl", "turtle", "squirrel", "whale", "hedgehog"]
DOES = ["learns to fly", "finds a lost key", "opens a bakery", "travels to the moon", "makes a new friend",
        "wins a race", "learns to paint", "saves the village", "gets lost in a city"]
MOODS = ["tired", "stressed", "bored", "anxious", "unmotivated", "happy", "nervous", "homesick"]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Seoul", "Perth", "Rome", "Nairobi", "Lisbon",
          "Hanoi", "Toronto", "Vienna", "Mumbai", "Denver"]
CHAT_STYLES = ["", "", "Please keep it short.", "Use bullet points.", "Be friendly and clear.",
               "Answer in two or three sentences.", "Make it fun.", "Be detailed."]
CHAT_FOLLOW_UPS = ["Can you give an example?", "Summarize that in one sentence.", "Explain it more simply.",
                   "Tell me more about the first point.", "Thanks! What else should I know?",
                   "Can you make it shorter?", "Why is that?"]


def _chat_prompt(rng: random.Random) -> str:
    p, q = rng.choice(PAIRS)
    style = rng.choice(CHAT_STYLES)
    return (rng.choice(CHAT_TEMPLATES) + (" " + style if style else "")).format(
        topic=rng.choice(TOPICS), activity=rng.choice(ACTIVITIES), n=rng.randint(3, 7), p=p, q=q,
        who=rng.choice(WHO), ask=rng.choice(ASK), animal=rng.choice(ANIMALS), does=rng.choice(DOES),
        mood=rng.choice(MOODS), city=rng.choice(CITIES))


# --------------------------------------------------------------------------------------- agent roles
# Tasks for the agent team (distinct from benchmarks/workload.py's own 16 tasks, so its traffic stays unseen).
AGENT_TASKS = [
    ("parse_log", "extract the error lines with their timestamps from a server log"),
    ("csv_to_json", "convert a CSV file into a list of JSON records"),
    ("word_freq", "report the ten most frequent words of a document"),
    ("backoff_fetch", "download a web page, retrying with a growing delay on failure"),
    ("ttl_cache", "cache function results and expire them after a time-to-live"),
    ("schedule_overlap", "detect overlapping meetings in a calendar"),
    ("password_check", "check that a password is strong enough"),
    ("token_bucket", "throttle API calls with a token bucket"),
    ("deep_merge", "merge two nested dictionaries recursively"),
    ("stream_stats", "keep the mean and variance of a stream of numbers"),
    ("config_diff", "show which settings differ between two YAML config files"),
    ("split_archive", "split a big file into parts of at most N megabytes"),
    ("percentile", "compute the 95th percentile latency from a list of timings"),
    ("url_parse", "extract the domain and query parameters from a URL"),
    ("matrix_inverse", "invert a small square matrix"),
    ("interval_search", "find which interval of a sorted list contains a value"),
    ("dedupe_files", "find duplicate files in a folder by their content hash"),
    ("retry_queue", "re-run failed background jobs up to three times"),
    ("tree_depth", "compute the depth of a binary tree"),
    ("cron_next", "compute the next run time of a simple daily schedule"),
    ("invoice_total", "sum an invoice's line items with tax and discounts"),
    ("temperature_alert", "alert when a sensor reading stays above a limit for five minutes"),
    ("graph_path", "find the shortest path between two nodes of a graph"),
    ("text_wrap", "wrap a paragraph to a fixed line width"),
    ("inventory", "track stock levels and warn when an item runs low"),
    ("email_batch", "send a newsletter to a list of users in batches of 50"),
    ("unit_convert", "convert between metric and imperial units"),
    ("leaderboard", "keep a sorted leaderboard of player scores"),
    ("env_loader", "load settings from environment variables with defaults"),
    ("markdown_toc", "build a table of contents from the headings of a Markdown file"),
    ("bank_account", "model a bank account with deposits, withdrawals and an overdraft limit"),
    ("sql_report", "summarize monthly sales from a database table"),
    ("image_resize", "resize every image in a folder to a maximum width"),
    ("json_validate", "validate a JSON document against required keys and types"),
    ("queue_worker", "process tasks from a queue with a pool of worker threads"),
    ("timezone_convert", "convert a meeting time between two time zones"),
    ("shopping_cart", "add, remove and total items in a shopping cart"),
    ("anagram_groups", "group a list of words into anagram families"),
    ("rolling_window", "compute a moving average over a sliding window"),
    ("file_watcher", "react when a file in a folder changes"),
]
TOOL_SPECS = [
    ("search_docs", {"query": "str", "limit": "int"}), ("run_tests", {"path": "str", "verbose": "bool"}),
    ("read_file", {"path": "str"}), ("write_file", {"path": "str", "content": "str"}),
    ("open_issue", {"title": "str", "body": "str", "labels": "list[str]"}), ("get_weather", {"city": "str",
                                                                                          "unit": "str"}),
    ("query_db", {"sql": "str", "limit": "int"}), ("send_email", {"to": "str", "subject": "str", "body": "str"}),
    ("create_event", {"title": "str", "date": "str", "duration_min": "int"}),
    ("list_files", {"folder": "str", "pattern": "str"}), ("http_get", {"url": "str", "timeout_s": "float"}),
    ("translate", {"text": "str", "target_lang": "str"}), ("calculator", {"expression": "str"}),
    ("get_stock_price", {"symbol": "str"}), ("book_flight", {"origin": "str", "destination": "str", "date": "str"}),
]
PROJECT_FILES = ["src/app.py", "README.md", "tests/test_core.py", "config/settings.yaml", "data/users.csv",
                 "logs/server.log", "docs/api.md", "setup.py", "src/utils/helpers.py", "notes.txt"]
STOCKS = ["AAPL", "MSFT", "NVDA", "AMZN", "TSLA", "GOOG"]
LANGS = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese"]

PLANNER_FIRST = [
    "Task: {what}. Plan the work for the team.",
    "We need to {what}. What are the steps?",
    "Plan how to {what}. Keep each step to one line.",
    "Our next feature: {what}. Break it into tasks for a coder and a reviewer.",
    "Task: {what}. The deadline is {when}. Plan the work.",
]
PLANNER_FOLLOW = ["What is the next step?", "Which step is the riskiest, and why?", "Shorten the plan to three steps.",
                  "Who should do each step: the coder or the reviewer?", "The coder finished step 1. What now?",
                  "Add a step for testing.", "How long will each step take?", "What could go wrong?"]
CODER_FIRST = [
    "Write a Python function `{name}` that does this: {what}.",
    "Implement `{name}` in Python: {what}.",
    "Write Python code to {what}. Name the main function `{name}`.",
    "The planner says step 1 is: {what}. Write the function `{name}`.",
]
CODER_FOLLOW = ["Add type hints and a docstring.", "Add error handling for bad input.",
                "Write a unit test for it with pytest.", "Make it faster.", "The reviewer says the function is too "
                "long. Split it into two helpers.", "Use only the standard library.",
                "Add logging instead of print statements.", "Rename the variables to be clearer."]
REVIEWER_FOLLOW = ["Which problem matters most?", "Suggest a fix for the first problem.", "Is the code thread-safe?",
                   "Does it handle empty input?", "Rate the code from 1 to 10.", "Is there a security issue?",
                   "What test cases are missing?"]
REVIEW_SNIPPETS = [
    "def {name}(data):\n    result = []\n    for item in data:\n        if item not in result:\n"
    "            result.append(item)\n    return result",
    "def {name}(path):\n    f = open(path)\n    lines = f.readlines()\n    return [l.strip() for l in lines]",
    "def {name}(items, n):\n    out = {{}}\n    for i in items:\n        out[i] = out.get(i, 0) + 1\n"
    "    return sorted(out, key=out.get)[:n]",
    "def {name}(x, cache={{}}):\n    if x in cache:\n        return cache[x]\n    cache[x] = x * 2\n    return cache[x]",
    "def {name}(values):\n    total = 0\n    for i in range(len(values) + 1):\n        total += values[i]\n"
    "    return total / len(values)",
    "import requests\n\ndef {name}(url):\n    while True:\n        try:\n            return requests.get(url).text\n"
    "        except Exception:\n            pass",
    "def {name}(user_input):\n    query = \"SELECT * FROM users WHERE name = '\" + user_input + \"'\"\n"
    "    return db.execute(query)",
    "class {cls}:\n    def __init__(self):\n        self.items = []\n\n    def add(self, x):\n        self.items.append(x)\n\n"
    "    def get(self, i):\n        return self.items[i]",
    "def {name}(a, b):\n    if a == None or b == None:\n        return\n    return a + b",
    "def {name}(text):\n    words = text.split(' ')\n    counts = dict()\n    for w in words:\n        if w in counts:\n"
    "            counts[w] += 1\n        else:\n            counts[w] = 1\n    return counts",
]
TOOL_FIRST = [
    "Goal: {what}. First call the tool {tool} for the project in {city}.",
    "Call {tool} to help with this: {what}.",
    "Use the tools to {what}. Start with {tool}.",
    "What is the weather in {city}? Use get_weather.",
    "Find the documentation about {topic}. Use search_docs with limit {n}.",
    "Read the file {file} with read_file.",
    "Run the tests in {file} with run_tests.",
    "Send an email to {person}@example.com with the subject \"{subject}\".",
    "Look up the stock price of {stock}.",
    "Translate \"{phrase}\" into {lang}.",
    "Compute {x} * {y} + {z} with the calculator tool.",
    "Open an issue titled \"{subject}\" with the label bug.",
    "Book a flight from {city} to {city2} on 2025-{mo:02d}-{day:02d}.",
    "Schedule a {y}0-minute meeting called \"{subject}\" on 2025-{mo:02d}-{day:02d}.",
]
TOOL_FOLLOW = ["Now call {tool} for {city}.", "Call {tool} with the file name from the previous result.",
               "Call {tool} again with limit {n}.", "The tool returned an error. Try again with different arguments.",
               "Now read the file {file}.", "The result was empty. Call search_docs with a broader query.",
               "Good. Now write the summary to {file} with write_file.", "Call get_weather for {city} in celsius."]
SUBJECTS = ["Weekly report", "Build is failing", "Release notes", "Meeting moved", "Login page broken",
            "Quarterly review", "Update the docs", "Crash on startup"]
PHRASES = ["Good morning", "Where is the train station?", "Thank you for your help", "The meeting starts at noon",
           "I would like a coffee"]
WHEN = ["Friday", "next week", "the end of the month", "tomorrow", "in two days"]


def _tool_list(rng: random.Random) -> str:
    tools = rng.sample(TOOL_SPECS, rng.randint(3, 6))
    return "\n".join(f"- {n}({', '.join(f'{k}: {t}' for k, t in args.items())})" for n, args in tools)


def _agent_system(role: str, rng: random.Random) -> str:
    """The workload's system prompt most of the time; a variant otherwise (agents phrase these differently)."""
    base = AGENT_SYSTEM[role]
    r = rng.random()
    if r < 0.6:
        return base
    if role == "tool_caller":
        return base + "\nAvailable tools:\n" + _tool_list(rng)
    extra = {"planner": ["Number every step.", "Use at most six steps.", "Mention who does each step."],
             "coder": ["Use type hints.", "Follow PEP 8.", "Prefer the standard library."],
             "reviewer": ["Be concise.", "Focus on correctness first.", "Mention edge cases."]}[role]
    return f"{base} {rng.choice(extra)}"


def _fill(rng: random.Random, text: str, task: tuple[str, str]) -> str:
    name, what = task
    return text.format(
        name=name, what=what, cls="".join(w.capitalize() for w in name.split("_")), when=rng.choice(WHEN),
        tool=rng.choice(TOOL_SPECS)[0], city=rng.choice(CITIES), city2=rng.choice(CITIES), n=rng.randint(2, 20),
        file=rng.choice(PROJECT_FILES), topic=rng.choice(TOPICS), person=rng.choice(NAMES).lower(),
        subject=rng.choice(SUBJECTS), stock=rng.choice(STOCKS), phrase=rng.choice(PHRASES), lang=rng.choice(LANGS),
        x=rng.randint(2, 999), y=rng.randint(2, 9), z=rng.randint(2, 99), mo=rng.randint(1, 12), day=rng.randint(1, 28))


def _agent_turns(role: str, rng: random.Random) -> tuple[str, ...]:
    task = rng.choice(AGENT_TASKS)
    if role == "planner":
        first = _fill(rng, rng.choice(PLANNER_FIRST), task)
    elif role == "coder":
        first = _fill(rng, rng.choice(CODER_FIRST), task)
    elif role == "reviewer":
        code = _fill(rng, rng.choice(REVIEW_SNIPPETS), task)
        first = rng.choice([f"Review this function:\n```python\n{code}\n```\nIt is meant to {task[1]}.",
                            f"Please review:\n```python\n{code}\n```",
                            f"The coder wrote this to {task[1]}:\n```python\n{code}\n```\nWhat is wrong with it?"])
    else:
        first = _fill(rng, rng.choice(TOOL_FIRST), task)
    follow = {"planner": PLANNER_FOLLOW, "coder": CODER_FOLLOW, "reviewer": REVIEWER_FOLLOW,
              "tool_caller": TOOL_FOLLOW}[role]
    n_turns = rng.choices([1, 2, 3, 4], [30, 30, 25, 15])[0]
    rest = [_fill(rng, t, task) for t in rng.sample(follow, n_turns - 1)]
    return (first, *rest)


# ------------------------------------------------------------------------------------------- builder
def _make(cat: str, rng: random.Random, funcs) -> tuple[str | None, tuple[str, ...]]:
    if cat in AGENT_ROLES:
        return _agent_system(cat, rng), _agent_turns(cat, rng)
    first = _math_prompt(rng) if cat == "math" else _code_prompt(rng, funcs) if cat == "code" else _chat_prompt(rng)
    follow = {"math": MATH_FOLLOW_UPS, "code": CODE_FOLLOW_UPS, "chat": CHAT_FOLLOW_UPS}[cat]
    return None, (first, rng.choice(follow)) if rng.random() < 0.2 else (first,)


DEFAULT_COUNTS = {"math": 2000, "code": 2000, "chat": 2000, "planner": 1000, "coder": 1200, "reviewer": 1000,
                  "tool_caller": 1200}


def parse_counts(text: str) -> dict[str, int]:
    """'math=2000,code=2000,...' -> counts (unknown categories refused)."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in CATEGORIES:
            raise ValueError(f"unknown prompt category {k!r}; known: {', '.join(CATEGORIES)}")
        try:
            out[k] = int(v)
        except ValueError:
            raise ValueError(f"count for {k!r} must be an integer, got {v!r}") from None
    return out


def build_conversations(counts: dict[str, int] | int | None = None, n_heldout: int = 40,
                        seed: int = 0) -> list[Conversation]:
    """``counts[cat]`` distinct conversations per category (an int: the same for all categories); the first
    ``n_heldout`` of each are held out. A smaller count gives a prefix of a larger one, per category."""
    if counts is None:
        counts = dict(DEFAULT_COUNTS)
    elif isinstance(counts, int):
        counts = {c: counts for c in CATEGORIES}
    funcs = _stdlib_functions() if "code" in counts else []
    out: list[Conversation] = []
    for cat, n in counts.items():
        if cat not in CATEGORIES:
            raise ValueError(f"unknown prompt category {cat!r}; known: {', '.join(CATEGORIES)}")
        if n <= n_heldout:
            raise ValueError(f"{cat}: {n} conversations leave none for training after {n_heldout} held out")
        rng = random.Random(f"{seed}:{cat}")
        seen: set[str] = set()
        tries = 0
        while len(seen) < n:
            tries += 1
            if tries > 50 * n:
                raise ValueError(f"cannot make {n} distinct {cat} conversations")
            system, turns = _make(cat, rng, funcs)
            key = json.dumps([system, turns])
            if key in seen:
                continue
            seen.add(key)
            cid = f"{cat}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
            out.append(Conversation(cid, cat, system, turns, "heldout" if len(seen) <= n_heldout else "train"))
    return out


def build_prompts(n_per_category: int = 300, n_heldout: int = 20, seed: int = 0,
                  categories: tuple[str, ...] = CATEGORIES) -> list[Conversation]:
    """Single-count form of ``build_conversations`` (engine benchmarks take ``.text`` of the held-out ones)."""
    return build_conversations({c: n_per_category for c in categories}, n_heldout, seed)


def interleave(convs: list[Conversation]) -> list[Conversation]:
    """Categories round-robin (a generation run stopped early still holds every category)."""
    by_cat: dict[str, list[Conversation]] = {}
    for c in convs:
        by_cat.setdefault(c.category, []).append(c)
    out, i = [], 0
    while len(out) < len(convs):
        for rows in by_cat.values():
            if i < len(rows):
                out.append(rows[i])
        i += 1
    return out
