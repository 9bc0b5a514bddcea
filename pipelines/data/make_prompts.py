"""Generate the bundled prompt sets (tiny_* and demo_*) from templates x topics; deterministic.

Run ``python pipelines/data/make_prompts.py`` to rewrite the JSONL files next to this script. All prompts are
written for this project (no dataset is copied). Each row is ``{"prompt", "answer"?, "category"}``; ``answer`` is a
number, present only for arithmetic prompts, and is used by eval scoring.

- tiny_train / tiny_eval: very short ASCII prompts for the tiny pipeline (byte-level tokenizer, < 60 characters).
- demo_train / demo_eval: short, varied instruction prompts a 135M-parameter chat model can answer sensibly.
- hybrid_train / hybrid_eval: two-digit sums with a worked gold ``solution`` (tens, then ones, then the total: the
  answer comes last), for the hybrid SFT + OPD pipeline (pipelines/tiny_hybrid.toml). Drawn from a random stream of
  their own, so adding them left the other sets as they were.

Train and eval never share a topic (so never a prompt): each category's topics are split first, then templates
are applied. Arithmetic prompts get fresh random numbers and are de-duplicated across the two splits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 2024

# ---- tiny sets -------------------------------------------------------------------------------------------------

TINY_TOPICS = ["the sun", "a cat", "the sea", "a tree", "the moon", "a dog", "snow", "a bird", "rain", "a fish",
               "the sky", "a book", "bread", "a car", "a flower", "milk"]
TINY_TEMPLATES = ["Tell me about {}.", "Say one fact about {}.", "Describe {} in one word.",
                  "Write a short line about {}."]

# ---- demo sets: (templates, topics) groups per category ------------------------------------------------------

COUNTRIES = ["France", "Japan", "Brazil", "Egypt", "Canada", "Kenya", "Italy", "India", "Mexico", "Norway",
             "Australia", "Peru"]
ANIMALS = ["an octopus", "a spider", "a cow", "a penguin", "an ant", "a horse", "a bee", "a dolphin", "an eagle",
           "a frog", "a snake", "a camel"]
SCIENCE_QUESTIONS = [
    "What gas do plants take in from the air?", "Why is the sky blue?", "What is the boiling point of water?",
    "Which planet is closest to the sun?", "What is the largest ocean on Earth?", "How many days are in a leap year?",
    "What do bees make?", "What is the hardest natural material?", "Why do we have day and night?",
    "What is the freezing point of water in Celsius?",
]

CATEGORIES: dict[str, list[tuple[list[str], list[str]]]] = {
    "factual": [
        (["What is the capital of {}?", "On which continent is {}?", "What language do most people speak in {}?"],
         COUNTRIES),
        (["How many legs does {} have?", "What does {} usually eat?", "Where does {} usually live?"], ANIMALS),
        (["{}"], SCIENCE_QUESTIONS),
    ],
    "explanation": [
        (["Explain {} in simple words.", "Give a short explanation of {}.", "Describe {} to a ten-year-old."],
         ["photosynthesis", "gravity", "the water cycle", "inflation", "electricity", "a vaccine", "the internet",
          "a black hole", "evolution", "recycling", "democracy", "a solar eclipse", "the immune system",
          "compound interest", "supply and demand", "a volcano", "the seasons", "a rainbow", "sleep", "friction"]),
    ],
    "how_to": [
        (["How do I {}?", "What are the steps to {}?", "Give me simple instructions to {}."],
         ["boil an egg", "plant a tree", "tie a tie", "make a cup of tea", "change a flat bike tire",
          "write a thank-you note", "clean a laptop screen", "start a vegetable garden", "fold a paper airplane",
          "prepare for a job interview", "make a monthly budget", "wash a wool sweater", "back up my photos",
          "make pancakes", "stretch before running", "remove a coffee stain", "set up a fish tank",
          "memorize a short poem", "pack a suitcase"]),
    ],
    "rewriting": [
        (["Rewrite this sentence to sound more formal: \"{}\"", "Make this sentence shorter: \"{}\"",
          "Rewrite this sentence in a friendly tone: \"{}\"", "Turn this sentence into a question: \"{}\""],
         ["hey, can you send me the report by tomorrow", "The meeting moved to Friday because many people are away.",
          "We regret to inform you that the package is late.", "I think maybe we should probably leave a bit earlier.",
          "Your order has shipped and should arrive soon.", "The park will be closed for cleaning on Monday.",
          "Please remember to turn off the lights when you leave.", "The new library opens next week.",
          "I can't come to the party because I have a cold.", "Our team finished the project two days early."]),
        (["Fix the grammar in this sentence: \"{}\""],
         ["She don't like apples.", "Me and him goes to school together.", "They was late for the bus.",
          "I has two brother.", "The dog chased it's tail.", "We was going to the store yesterday."]),
    ],
    "list": [
        (["List three {}.", "Name five {}.", "Give me a short list of {}."],
         ["fruits that are red", "ways to save water at home", "board games for families",
          "things to pack for a beach trip", "healthy breakfast ideas", "planets in our solar system",
          "musical instruments", "habits that help you sleep better", "indoor hobbies", "birds that cannot fly",
          "words that rhyme with cat", "ways to reduce stress", "kitchen tools", "famous painters",
          "sports played with a ball"]),
    ],
    "definition": [
        (["Define the word \"{}\".", "What does \"{}\" mean?", "Use the word \"{}\" in a sentence."],
         ["curious", "generous", "ancient", "fragile", "reluctant", "humble", "vivid", "brave", "predict",
          "migrate", "harvest", "gentle", "rapid", "ordinary"]),
    ],
    "advice": [
        (["Give me one tip for {}.", "What is the best advice for {}?", "Share two quick tips for {}."],
         ["staying focused while studying", "a first day at a new job", "saving money each month",
          "sleeping better", "speaking in public", "learning a new language", "keeping a houseplant alive",
          "making friends in a new city", "running a first 5k race", "a long flight", "cooking for the first time",
          "keeping a desk tidy"]),
    ],
    "creative": [
        (["Write a one-line poem about {}.", "Write a funny one-liner about {}.", "Write a one-sentence story about {}.",
          "Write a short riddle about {}."],
         ["the ocean", "a rainy morning", "a lost sock", "a lighthouse", "coffee", "the moon", "a lazy cat",
          "autumn leaves", "a friendly robot", "a small bakery", "a paper boat", "a city at night"]),
    ],
    "coding": [
        (["How do I {} in Python?", "Explain in plain words how to {} in Python.",
          "Write a short Python function to {}."],
         ["reverse a list", "check if a number is even", "count the words in a string",
          "read a text file line by line", "find the largest number in a list", "remove duplicates from a list",
          "join a list of words into a sentence", "sort a list of names", "convert a string to uppercase",
          "add up the numbers in a list", "check if a word is a palindrome", "swap two variables"]),
        (["What is {} in programming?", "Explain what {} means in programming, with a small example."],
         ["a variable", "a loop", "a function", "recursion", "an array", "a bug", "a class"]),
    ],
}

# (eval, train) prompt counts per category; arithmetic categories carry answers.
DEMO_COUNTS = {
    "factual": (6, 30), "explanation": (6, 30), "how_to": (6, 28), "rewriting": (5, 22), "list": (5, 25),
    "definition": (4, 22), "advice": (4, 22), "creative": (4, 25), "coding": (5, 26),
    "word_problem": (9, 45), "math": (6, 25),
}

NAMES = ["Sam", "Maya", "Leo", "Ava", "Omar", "Lina", "Noah", "Zoe", "Ivan", "Priya"]
ITEMS = ["apple", "pencil", "marble", "sticker", "cookie", "book", "card", "stamp"]


def word_problem(rng: random.Random) -> tuple[str, int]:
    """One small arithmetic story problem and its integer answer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 30), rng.randint(2, 9)
    kind = rng.randrange(6)
    if kind == 0:
        return f"{name} has {a} {item}s and buys {b} more. How many {item}s does {name} have now?", a + b
    if kind == 1:
        return f"{name} had {a + b} {item}s and gave {b} to a friend. How many {item}s are left?", a
    if kind == 2:
        return f"A box holds {b} {item}s. How many {item}s are in {a} boxes?", a * b
    if kind == 3:
        return f"{name} shares {a * b} {item}s equally among {b} friends. How many does each friend get?", a
    if kind == 4:
        return f"A ticket costs {b} dollars. How many dollars do {a} tickets cost?", a * b
    return f"{name} reads {a} pages a day. How many pages does {name} read in {b} days?", a * b


def math_question(rng: random.Random) -> tuple[str, int]:
    """One bare arithmetic question and its integer answer."""
    a, b = rng.randint(2, 99), rng.randint(2, 12)
    kind = rng.randrange(5)
    if kind == 0:
        return f"What is {a} plus {b * 7}?", a + b * 7
    if kind == 1:
        return f"What is {a} times {b}?", a * b
    if kind == 2:
        return f"What is {a + b * 5} minus {b * 5}?", a
    if kind == 3:
        return f"What is {a * b} divided by {b}?", a
    return f"What is {b * 5} percent of 200?", b * 10


def tiny_sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} plus {b}?", a + b


def split_topics(groups, num_eval_topics: int, rng: random.Random):
    """Shuffle all (templates, topic) pairs of a category and cut them into eval topics and train topics."""
    topics = [(templates, topic) for templates, group_topics in groups for topic in group_topics]
    rng.shuffle(topics)
    return topics[:num_eval_topics], topics[num_eval_topics:]


def every_prompt(topics) -> list[str]:
    return [template.format(topic) for templates, topic in topics for template in templates]


def unique_problems(make, count: int, rng: random.Random) -> list[tuple[str, int]]:
    problems: dict[str, int] = {}
    while len(problems) < count:
        text, answer = make(rng)
        problems.setdefault(text, answer)
    return list(problems.items())


def build_prompt_sets() -> dict[str, list[dict]]:
    """All four prompt sets as lists of rows, keyed by file stem."""
    rng = random.Random(SEED)
    sets: dict[str, list[dict]] = {}

    # tiny: 3 eval topics x 4 templates = 12 chat prompts, 13 train topics x 4 = 52; plus 4 / 12 sums
    eval_topics, train_topics = split_topics([(TINY_TEMPLATES, TINY_TOPICS)], 3, rng)
    sums = unique_problems(tiny_sum, 16, rng)
    sets["tiny_eval"] = [{"prompt": p, "category": "chat"} for p in every_prompt(eval_topics)]
    sets["tiny_eval"] += [{"prompt": p, "answer": a, "category": "math"} for p, a in sums[:4]]
    sets["tiny_train"] = [{"prompt": p, "category": "chat"} for p in every_prompt(train_topics)]
    sets["tiny_train"] += [{"prompt": p, "answer": a, "category": "math"} for p, a in sums[4:]]

    demo_eval: list[dict] = []
    demo_train: list[dict] = []
    for category, groups in CATEGORIES.items():
        num_eval, num_train = DEMO_COUNTS[category]
        # demo: one prompt per eval topic (more topics seen in eval), train samples from the other topics
        eval_topics, train_topics = split_topics(groups, num_eval, rng)
        eval_prompts = [rng.choice(templates).format(topic) for templates, topic in eval_topics]
        train_pool = every_prompt(train_topics)
        rng.shuffle(train_pool)
        assert len(train_pool) >= num_train, f"{category}: add topics, only {len(train_pool)} train prompts"
        train_prompts = train_pool[:num_train]
        demo_eval += [{"prompt": prompt, "category": category} for prompt in eval_prompts]
        demo_train += [{"prompt": prompt, "category": category} for prompt in train_prompts]
    for category, make in (("word_problem", word_problem), ("math", math_question)):
        num_eval, num_train = DEMO_COUNTS[category]
        problems = unique_problems(make, num_eval + num_train, rng)
        rows = [{"prompt": text, "answer": answer, "category": category} for text, answer in problems]
        demo_eval += rows[:num_eval]
        demo_train += rows[num_eval:]
    sets["demo_eval"], sets["demo_train"] = demo_eval, demo_train

    for rows in sets.values():
        rng.shuffle(rows)  # mix categories so even an unshuffled pass sees variety
    return sets


def worked_sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", a + b


def solution(prompt: str) -> str:
    """The worked gold solution of a worked_sum prompt: the answer only at the end."""
    a, b = (int(number) for number in prompt[len("What is "):-1].split(" plus "))
    tens, ones = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
    return f"Add the tens: {a // 10 * 10} + {b // 10 * 10} = {tens}. Add the ones: {a % 10} + {b % 10} = {ones}. " \
           f"So the sum is {tens + ones}."


def build_hybrid_sets() -> dict[str, list[dict]]:
    """hybrid_train (48 rows) and hybrid_eval (8 rows), each row with its gold solution."""
    sums = unique_problems(worked_sum, 56, random.Random(SEED + 1))
    rows = [{"prompt": p, "answer": a, "solution": solution(p), "category": "math"} for p, a in sums]
    return {"hybrid_eval": rows[:8], "hybrid_train": rows[8:]}


def write_prompt_sets(directory: Path) -> None:
    for name, rows in {**build_prompt_sets(), **build_hybrid_sets()}.items():
        lines = [json.dumps(row, ensure_ascii=True) for row in rows]
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="ascii")


if __name__ == "__main__":
    write_prompt_sets(Path(__file__).resolve().parent)
