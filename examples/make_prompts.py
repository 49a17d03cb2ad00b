"""Generates the shipped prompt files examples/data/prompts_{train,eval}.jsonl (deterministic).

Every record is `{"prompt": str, "response": str | null, "answer": str | null, "category": str}`:
- checkable prompts (arithmetic, case, counting, facts, formatting, ...) carry an exact `answer`, and their
  `response` is that answer;
- open prompts (explanations, rewriting, lists, definitions, ...) have `answer: null`; their `response` is left
  null here and filled in once by `examples/make_responses.py` with the demo teacher.

Re-running this script keeps the responses already present in the output files (matched by prompt), so it can be
used to add prompts without regenerating every teacher response.

    python examples/make_prompts.py            # writes examples/data/prompts_{train,eval}.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SEED = 20240611
N_EVAL = 60

# ----------------------------------------------------------------------------------------------------------------
# Checkable generators: each returns a list of (prompt, answer).
# ----------------------------------------------------------------------------------------------------------------


def arithmetic(rng: random.Random, n: int) -> list[tuple[str, str]]:
    forms = [
        ("What is {a} + {b}? Reply with only the number.", lambda a, b: a + b),
        ("Compute {a} plus {b}. Answer with just the number.", lambda a, b: a + b),
        ("Add {a} and {b}. Give only the result.", lambda a, b: a + b),
        ("What is {a} - {b}? Reply with only the number.", lambda a, b: a - b),
        ("Subtract {b} from {a}. Answer with just the number.", lambda a, b: a - b),
        ("What is {a} times {b}? Reply with only the number.", lambda a, b: a * b),
        ("Calculate {a} * {b}. Give only the number.", lambda a, b: a * b),
        ("What is {a} divided by {b}? Reply with only the number.", None),
    ]
    out = []
    for i in range(n):
        text, fn = forms[i % len(forms)]
        if fn is None:  # exact division
            b = rng.randint(2, 9)
            q = rng.randint(2, 12)
            out.append((text.format(a=b * q, b=b), str(q)))
            continue
        if "times" in text or "*" in text:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        elif "-" in text or "Subtract" in text:
            a = rng.randint(20, 99)
            b = rng.randint(1, a - 1)
        else:
            a, b = rng.randint(3, 60), rng.randint(3, 60)
        out.append((text.format(a=a, b=b), str(fn(a, b))))
    return out


def word_problems(rng: random.Random, n: int) -> list[tuple[str, str]]:
    names = ["Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Raj", "Ivy", "Max", "Lea", "Omar", "Kai"]
    items = ["apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "shells"]
    out = []
    for i in range(n):
        who, what = rng.choice(names), rng.choice(items)
        a, b = rng.randint(2, 15), rng.randint(2, 9)
        if i % 3 == 0:
            p = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now? Reply with only the number."
            ans = a + b
        elif i % 3 == 1:
            a = a + b
            p = f"{who} had {a} {what} and gave away {b}. How many are left? Reply with only the number."
            ans = a - b
        else:
            a = rng.randint(2, 6)
            p = f"{who} buys {a} bags with {b} {what} in each bag. How many {what} in total? Reply with only the number."
            ans = a * b
        out.append((p, str(ans)))
    return out


WORDS = ["apple", "river", "garden", "planet", "window", "silver", "orange", "rocket", "pencil", "forest",
         "castle", "summer", "bridge", "tiger", "candle", "island", "guitar", "winter", "yellow", "market",
         "cloud", "lemon", "ocean", "marble", "pepper", "violin", "basket", "thunder", "meadow", "copper"]


def case(rng: random.Random, n: int) -> list[tuple[str, str]]:
    words = rng.sample(WORDS, n)
    out = []
    for i, w in enumerate(words):
        if i % 3 == 0:
            out.append((f"Write the word '{w}' in uppercase. Reply with only the word.", w.upper()))
        elif i % 3 == 1:
            out.append((f"Convert '{w.upper()}' to lowercase. Reply with only the word.", w))
        else:
            out.append((f"Capitalize the first letter of '{w}'. Reply with only the word.", w.capitalize()))
    return out


SENTENCES = ["The cat sat on the mat", "We went to the park today", "Birds sing in the morning",
             "She reads a book every night", "The sun is very bright", "Rain fell all day long",
             "My brother likes to cook pasta", "Dogs are loyal", "The train leaves at noon",
             "He painted the old fence blue"]


def count(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    words = rng.sample(WORDS, n)
    sents = SENTENCES[:]
    rng.shuffle(sents)
    for i in range(n):
        if i % 2 == 0:
            w = words[i]
            out.append((f"How many letters are in the word '{w}'? Reply with only the number.", str(len(w))))
        else:
            s = sents[i // 2 % len(sents)]
            out.append((f"How many words are in this sentence: '{s}'? Reply with only the number.",
                        str(len(s.split()))))
    return out


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def sequence(rng: random.Random, n: int) -> list[tuple[str, str]]:
    pool = []
    for i, d in enumerate(DAYS):
        pool.append((f"What day comes after {d}? Reply with one word.", DAYS[(i + 1) % 7]))
    for i, m in enumerate(MONTHS):
        pool.append((f"Which month comes right after {m}? Reply with one word.", MONTHS[(i + 1) % 12]))
    for c in "cfhkmpsw":
        pool.append((f"Which letter comes after '{c}' in the alphabet? Reply with only the letter.", chr(ord(c) + 1)))
    for start, step in [(2, 2), (5, 5), (3, 3), (10, 10), (1, 2), (4, 4)]:
        seq = [start + step * k for k in range(4)]
        pool.append((f"What is the next number: {', '.join(map(str, seq))}? Reply with only the number.",
                     str(start + step * 4)))
    return rng.sample(pool, n)


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Russia", "Moscow"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
            ("Thailand", "Bangkok"), ("Sweden", "Stockholm"), ("China", "Beijing"), ("Argentina", "Buenos Aires")]


def capital(rng: random.Random, n: int) -> list[tuple[str, str]]:
    forms = ["What is the capital of {c}? Reply with only the city name.",
             "Name the capital city of {c}. Answer with just the name."]
    return [(forms[i % 2].format(c=c), cap) for i, (c, cap) in enumerate(rng.sample(CAPITALS, n))]


ANTONYMS = [("hot", "cold"), ("up", "down"), ("day", "night"), ("left", "right"), ("win", "lose"),
            ("true", "false"), ("black", "white"), ("north", "south"), ("push", "pull"), ("early", "late"),
            ("buy", "sell"), ("wet", "dry"), ("full", "empty"), ("fast", "slow"), ("asleep", "awake"),
            ("inside", "outside"), ("first", "last"), ("question", "answer")]


def antonym(rng: random.Random, n: int) -> list[tuple[str, str]]:
    forms = ["What is the opposite of '{w}'? Reply with one word.", "Give the antonym of '{w}'. Answer with one word."]
    return [(forms[i % 2].format(w=w), a) for i, (w, a) in enumerate(rng.sample(ANTONYMS, n))]


def compare(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    seen = set()
    while len(out) < n:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        if len(out) % 2 == 0:
            out.append((f"Which is larger, {a} or {b}? Reply with only the number.", str(max(a, b))))
        else:
            out.append((f"Which number is smaller: {a} or {b}? Reply with only the number.", str(min(a, b))))
    return out


def parity(rng: random.Random, n: int) -> list[tuple[str, str]]:
    nums = rng.sample(range(11, 200), n)
    return [(f"Is {k} even or odd? Reply with one word.", "even" if k % 2 == 0 else "odd") for k in nums]


def formatting(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            ws = rng.sample(["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "book", "cup"], 3)
            out.append((f"Join the words {ws[0]}, {ws[1]} and {ws[2]} with hyphens, in that order. Reply with only the result.",
                        "-".join(ws)))
        elif kind == 1:
            nums = rng.sample(range(1, 50), 4)
            out.append((f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}. "
                        "Reply with the numbers separated by commas.", ", ".join(map(str, sorted(nums)))))
        elif kind == 2:
            w = rng.choice(WORDS)
            out.append((f"Repeat the word '{w}' three times, separated by spaces. Reply with only that.",
                        " ".join([w] * 3)))
        elif kind == 3:
            w = rng.choice(WORDS)
            out.append((f"What is the first letter of the word '{w}'? Reply with only the letter.", w[0]))
        else:
            w = rng.choice(WORDS)
            out.append((f"What is the last letter of the word '{w}'? Reply with only the letter.", w[-1]))
    return out


def units(rng: random.Random, n: int) -> list[tuple[str, str]]:
    forms = [("How many minutes are in {k} hours? Reply with only the number.", 60),
             ("How many days are in {k} weeks? Reply with only the number.", 7),
             ("How many centimeters are in {k} meters? Reply with only the number.", 100),
             ("How many seconds are in {k} minutes? Reply with only the number.", 60),
             ("How many months are in {k} years? Reply with only the number.", 12)]
    out = []
    ks = rng.sample(range(2, 10), 8)
    for i in range(n):
        text, mul = forms[i % len(forms)]
        k = ks[i % len(ks)]
        out.append((text.format(k=k), str(k * mul)))
    return out


PLURALS = [("child", "children"), ("mouse", "mice"), ("box", "boxes"), ("city", "cities"), ("tooth", "teeth"),
           ("knife", "knives"), ("leaf", "leaves"), ("foot", "feet"), ("bus", "buses"), ("man", "men"),
           ("baby", "babies"), ("goose", "geese")]


def plural(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(f"What is the plural of '{w}'? Reply with one word.", p) for w, p in rng.sample(PLURALS, n)]


FACTS = [("How many legs does a spider have? Reply with only the number.", "8"),
         ("What color do you get by mixing blue and yellow? Reply with one word.", "green"),
         ("What planet do we live on? Reply with one word.", "Earth"),
         ("How many days are in a week? Reply with only the number.", "7"),
         ("What is the largest planet in our solar system? Reply with one word.", "Jupiter"),
         ("How many sides does a triangle have? Reply with only the number.", "3"),
         ("What gas do plants take in from the air? Reply with the name only.", "carbon dioxide"),
         ("What is frozen water called? Reply with one word.", "ice"),
         ("How many continents are there? Reply with only the number.", "7"),
         ("What is the chemical symbol for gold? Reply with only the symbol.", "Au"),
         ("How many hours are in a day? Reply with only the number.", "24"),
         ("Which animal is known as the king of the jungle? Reply with one word.", "lion"),
         ("What is the boiling point of water in Celsius? Reply with only the number.", "100"),
         ("How many sides does a hexagon have? Reply with only the number.", "6"),
         ("What color is the sky on a clear day? Reply with one word.", "blue"),
         ("Which star is closest to the Earth? Reply with one word.", "Sun")]


def facts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return rng.sample(FACTS, n)


CHECKABLE = {
    "arithmetic": (arithmetic, 32),
    "word_problem": (word_problems, 15),
    "case": (case, 14),
    "count": (count, 12),
    "sequence": (sequence, 14),
    "capital": (capital, 16),
    "antonym": (antonym, 14),
    "compare": (compare, 10),
    "parity": (parity, 8),
    "format": (formatting, 15),
    "units": (units, 10),
    "plural": (plural, 10),
    "fact": (facts, 14),
}

# ----------------------------------------------------------------------------------------------------------------
# Open prompts: category -> list of prompts (reference responses come from the demo teacher).
# ----------------------------------------------------------------------------------------------------------------

EXPLAIN_TOPICS = ["photosynthesis", "gravity", "a rainbow", "the water cycle", "an eclipse", "a volcano",
                  "the internet", "electricity", "a vaccine", "inflation", "a black hole", "the seasons",
                  "recycling", "a computer virus", "evaporation", "the tides", "a democracy", "friction",
                  "a habit", "compound interest", "an echo", "erosion", "a password", "sleep",
                  "a thunderstorm", "a battery", "a calendar", "digestion", "a map", "the moon's phases"]
EXPLAIN_FORMS = ["Explain {t} in one sentence.", "Briefly explain {t} to a child.", "What is {t}? Keep it short.",
                 "Describe {t} in simple words."]

DEFINE_WORDS = ["curious", "generous", "ancient", "harvest", "patience", "orbit", "fragile", "migrate",
                "brave", "budget", "glacier", "humble", "invent", "journey", "rhythm", "shelter", "tradition",
                "vivid", "wisdom", "horizon"]
DEFINE_FORMS = ["Define the word '{w}'.", "What does '{w}' mean?", "Give a short definition of '{w}'.",
                "Use the word '{w}' in a sentence."]

LIST_THINGS = ["fruits", "colors", "animals that live in the sea", "musical instruments", "vegetables",
               "things you find in a kitchen", "sports played with a ball", "types of weather", "birds",
               "jobs in a hospital", "things that are cold", "ways to save water", "shapes", "school subjects",
               "board games", "things to pack for a trip", "flowers", "ways to stay healthy", "insects",
               "breakfast foods"]
LIST_FORMS = ["List three {x}.", "Name three {x}.", "Give me a short list of {x}.", "What are some common {x}?"]

REWRITE_SENTENCES = ["i cant come to the meeting tomorow", "The movie was good and I liked it a lot.",
                     "Please send me the report as soon as you can.", "we goes to school every day",
                     "The weather is bad so we stay home.", "He don't like vegetables.",
                     "Can you help me with my homework?", "The food at the party was really really tasty.",
                     "She is going to the store for buy milk.", "I think that maybe we should leave now.",
                     "Our team won the game last night.", "The book is on the table near the window."]
REWRITE_FORMS = ["Rewrite this sentence more formally: '{s}'", "Fix the grammar and spelling: '{s}'",
                 "Make this sentence shorter: '{s}'", "Rewrite this sentence in a friendly tone: '{s}'"]

WRITE_SUBJECTS = ["the ocean", "a rainy day", "a lost cat", "the first day of school", "autumn leaves",
                  "a robot", "a quiet library", "the night sky", "a birthday party", "a mountain hike",
                  "a cup of coffee", "a small village", "a dragon", "the city at night"]
WRITE_FORMS = ["Write a short poem about {x}.", "Write one sentence about {x}.",
               "Give a title for a story about {x}.", "Write a haiku about {x}.", "Start a story about {x}."]

ADVICE = ["studying for an exam", "sleeping better", "learning a new language", "saving money",
          "making new friends", "staying focused", "cooking rice", "keeping a plant alive", "running faster",
          "writing an email", "staying calm", "drinking more water", "waking up early", "giving a speech",
          "organizing a desk", "reading more books"]
ADVICE_FORMS = ["Give one tip for {x}.", "What is a good way to start {x}?", "Give two tips for {x}."]

COMPARE_PAIRS = [("a cat", "a dog"), ("weather", "climate"), ("a lake", "a sea"), ("a virus", "a bacterium"),
                 ("speed", "velocity"), ("a town", "a city"), ("a fruit", "a vegetable"), ("a star", "a planet"),
                 ("hearing", "listening"), ("a laptop", "a desktop computer"), ("tea", "coffee"),
                 ("a poem", "a story"), ("rain", "snow"), ("a river", "a stream")]
COMPARE_FORMS = ["What is the difference between {a} and {b}?", "Compare {a} and {b} in one sentence."]

DESCRIBE = ["a bicycle", "a sunset", "a library", "an elephant", "a forest", "a busy street", "a beach",
            "a kitchen", "a train station", "a garden", "a snowstorm", "a market", "a classroom", "a bridge",
            "a lighthouse"]
DESCRIBE_FORMS = ["Describe {x} in exactly two sentences.", "Give three bullet points about {x}.",
                  "Describe {x} using three adjectives.", "Write a short description of {x}."]

REASONING = [
    "If it is raining outside, what should I bring when I leave the house?",
    "Why do people wear coats in winter?",
    "If a glass falls off a table, what will probably happen?",
    "Why should you wash your hands before eating?",
    "A shop closes at 6 pm and it is 5:30 pm. Do I have time to buy bread? Explain.",
    "Why do we put food in the fridge?",
    "If you plant a seed and water it, what happens over time?",
    "Why is it dangerous to touch a hot stove?",
    "Why do plants need sunlight?",
    "If all the lights go out at night, what could have happened?",
    "Why do birds fly south in winter?",
    "What happens to ice when you leave it in the sun?",
    "Why do people use umbrellas?",
    "If you study every day, how might your grades change?",
    "Why is it important to sleep well before a test?",
    "Why do we need to drink water?",
]


def _open_pool(rng: random.Random) -> dict[str, list[str]]:
    def fill(items, forms, key="t"):
        out = []
        for i, x in enumerate(items):
            out.append(forms[i % len(forms)].format(**{key: x}))
        return out

    pools = {
        "explain": fill(EXPLAIN_TOPICS, EXPLAIN_FORMS),
        "define": fill(DEFINE_WORDS, DEFINE_FORMS, "w"),
        "list": fill(LIST_THINGS, LIST_FORMS, "x"),
        "rewrite": [f.format(s=s) for s in REWRITE_SENTENCES for f in REWRITE_FORMS[:2]],
        "write": [f.format(x=x) for i, x in enumerate(WRITE_SUBJECTS)
                  for f in (WRITE_FORMS[i % 5], WRITE_FORMS[(i + 2) % 5])],
        "advice": fill(ADVICE, ADVICE_FORMS, "x"),
        "compare_open": [COMPARE_FORMS[i % 2].format(a=a, b=b) for i, (a, b) in enumerate(COMPARE_PAIRS)],
        "describe": fill(DESCRIBE, DESCRIBE_FORMS, "x"),
        "reasoning": list(REASONING),
    }
    for v in pools.values():
        rng.shuffle(v)
    return pools


def _split_counts(sizes: dict[str, int], n_eval: int) -> dict[str, int]:
    """Per-category eval counts proportional to size, summing to exactly n_eval (largest remainder)."""
    total = sum(sizes.values())
    raw = {k: v * n_eval / total for k, v in sizes.items()}
    counts = {k: int(r) for k, r in raw.items()}
    for k in sorted(raw, key=lambda k: (raw[k] - counts[k], k), reverse=True)[: n_eval - sum(counts.values())]:
        counts[k] += 1
    return counts


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    by_cat: dict[str, list[dict]] = {}
    for cat, (gen, n) in CHECKABLE.items():
        pairs = gen(rng, n)
        assert len(pairs) == n, cat
        by_cat[cat] = [{"prompt": p, "response": a, "answer": a, "category": cat} for p, a in pairs]
    for cat, prompts in _open_pool(rng).items():
        by_cat[cat] = [{"prompt": p, "response": None, "answer": None, "category": cat} for p in prompts]

    seen: set[str] = set()
    for recs in by_cat.values():
        for r in recs:
            if r["prompt"] in seen:
                raise AssertionError(f"duplicate prompt: {r['prompt']!r}")
            seen.add(r["prompt"])

    eval_counts = _split_counts({k: len(v) for k, v in by_cat.items()}, N_EVAL)
    train, evals = [], []
    for cat, recs in by_cat.items():
        k = eval_counts[cat]
        evals.extend(recs[:k])
        train.extend(recs[k:])
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def _existing_responses(paths: list[Path]) -> dict[str, str]:
    known = {}
    for p in paths:
        if p.exists():
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("answer") is None and rec.get("response"):
                        known[rec["prompt"]] = rec["response"]
    return known


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DATA)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    train_path, eval_path = args.out_dir / "prompts_train.jsonl", args.out_dir / "prompts_eval.jsonl"
    known = _existing_responses([train_path, eval_path])
    train, evals = build(args.seed)
    for r in train + evals:
        if r["answer"] is None:
            r["response"] = known.get(r["prompt"])
    write_jsonl(train_path, train)
    write_jsonl(eval_path, evals)
    for name, recs in (("train", train), ("eval", evals)):
        chk = sum(r["answer"] is not None for r in recs)
        missing = sum(r["response"] is None for r in recs)
        print(f"{name}: {len(recs)} prompts, {chk} checkable ({chk / len(recs):.0%}), "
              f"{missing} still need a teacher response (run examples/make_responses.py)")


if __name__ == "__main__":
    main()
