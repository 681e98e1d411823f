"""The documents of afterburner's lm-eval tasks, built from local text by seeded pure functions.

- ``mc_docs``: sentence continuation. The context is the first part of a local sentence; the four
  choices are its true ending and the endings of three other sentences of about the same length.
- ``passkey_docs``: needle retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", passkey test).
  A 5-digit pass key sits at a seeded depth inside filler prose; the prompt ends with
  "The pass key is" and the model must copy the key.
- ``colour_docs``: long-context multiple choice (several keys, as RULER's multi-key needles). Four
  people's favourite colours sit at seeded depths in filler prose; the question asks one of them and
  the four choices are the four colours the document names, so the answer needs the right fact, not
  just any fact, and a method that lost it guesses among them (chance: 1/4).

Lengths are in tokens, counted by a ``TokenCounter``. The default counts ``len(text) / 4.0``
(4 characters per token, the usual rule of thumb for English BPE), so the shipped files need no
tokenizer. Measured on the filler sentences: SmolLM2's tokenizer gives 4.6 characters per token, so a
``passkey_8192`` prompt is ~7,000 SmolLM2 tokens and fits its 8,192-token window with room to answer.
``--tokenizer DIR`` counts with a real tokenizer instead (per sentence, summed).

Randomness comes only from ``random.Random(str).random()``: Python guarantees that sequence across
versions (unlike ``shuffle``/``randint``), so the same seed gives the same files. The text itself comes
from stdlib docstrings (``text.local_sentences``): regenerate with the same Python minor version.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN = 4.0
HEADER = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key there."
)
NEEDLE = "The pass key is {passkey}. Remember it."
QUESTION = "What is the pass key? The pass key is"
_DIGIT = re.compile(r"\d")

TokenCounter = Callable[[str], float]


def chars_per_token_counter(text: str) -> float:
    """Tokenizer-free length: characters / CHARS_PER_TOKEN."""
    return len(text) / CHARS_PER_TOKEN


def rng_for(seed: int, *labels: object) -> random.Random:
    """A generator per (seed, task, doc): adding docs or lengths never shifts the others."""
    return random.Random("/".join(map(str, (seed, *labels))))


def below(rng: random.Random, n: int) -> int:
    """Uniform integer in [0, n) from ``rng.random()`` only (stable across Python versions)."""
    return min(int(rng.random() * n), n - 1)


def shuffled(rng: random.Random, items: Sequence) -> list:
    """Fisher-Yates with ``below``: ``random.shuffle``'s algorithm may change between versions."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = below(rng, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


# ----------------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class _Split:
    context: str
    ending: str


def _split(sentence: str, rng: random.Random) -> _Split | None:
    """Cut a sentence after 40-60% of its words; both sides keep at least three words."""
    words = sentence.split()
    if len(words) < 8:
        return None
    cut = round(len(words) * (0.4 + 0.2 * rng.random()))
    cut = max(3, min(cut, len(words) - 3))
    return _Split(" ".join(words[:cut]), " ".join(words[cut:]))


def mc_docs(sentences: Sequence[str], *, n_docs: int, seed: int) -> list[dict]:
    """``{"id", "context", "choices" (4), "label"}``; distractors are endings of other sentences whose
    word count is closest to the true ending's (so length alone does not give the answer away). Each
    context is used once, and no distractor completes it into a real sentence."""
    rng = rng_for(seed, "mc")
    splits = [s for s in (_split(sentence, rng) for sentence in sentences) if s is not None]
    real = set(sentences)
    docs: list[dict] = []
    used: set[str] = set()
    for index in shuffled(rng, range(len(splits))):
        if len(docs) == n_docs:
            break
        true = splits[index]
        if true.context in used:
            continue
        used.add(true.context)
        doc_rng = rng_for(seed, "mc", len(docs))
        n_words = len(true.ending.split())
        # Candidates in a seeded order, then stably sorted by length difference: ties stay random.
        candidates = shuffled(doc_rng, [s.ending for i, s in enumerate(splits) if i != index])
        candidates.sort(key=lambda ending: abs(len(ending.split()) - n_words))
        distractors: list[str] = []
        for ending in candidates:
            if ending not in distractors and f"{true.context} {ending}" not in real:
                distractors.append(ending)
            if len(distractors) == 3:
                break
        label = below(doc_rng, 4)
        choices = distractors[:label] + [true.ending] + distractors[label:]
        docs.append({"id": len(docs), "context": true.context, "choices": choices, "label": label})
    return docs


# ----------------------------------------------------------------------------------------- passkey


def filler_sentences(sentences: Sequence[str]) -> list[str]:
    """Sentences without digits: the pass key is then the only number in the prompt."""
    return [s for s in sentences if not _DIGIT.search(s)]


def passkey_prompt(context: str) -> str:
    """What the model reads; the task yaml renders the same string (``{{context}}\\n{{question}}``)."""
    return f"{context}\n{QUESTION}"


def spread_order(n: int) -> list[int]:
    """A permutation of range(n) whose every prefix is spread over [0, n): the ranks of the first n
    van der Corput numbers (0, 1/2, 1/4, 3/4, 1/8, ...). So ``--limit k`` still probes all depths."""

    def van_der_corput(i: int) -> float:
        value, scale = 0.0, 0.5
        while i:
            value, i, scale = value + scale * (i & 1), i >> 1, scale / 2
        return value

    points = [van_der_corput(i) for i in range(n)]
    ranks = sorted(range(n), key=points.__getitem__)
    order = [0] * n
    for rank, i in enumerate(ranks):
        order[i] = rank
    return order


def _fill(rng: random.Random, filler: Sequence[str], cost: dict[str, float], budget: float) -> list[str]:
    """Filler sentences in a seeded order (cycled if the text runs out) while they fit ``budget``."""
    order = shuffled(rng, filler)
    chosen: list[str] = []
    while budget >= 0:
        sentence = order[len(chosen) % len(order)]
        if cost[sentence] > budget:
            break
        chosen.append(sentence)
        budget -= cost[sentence]
    return chosen


def passkey_docs(
    filler: Sequence[str],
    *,
    length: int,
    n_docs: int,
    seed: int,
    count: TokenCounter = chars_per_token_counter,
) -> list[dict]:
    """``{"id", "context", "question", "passkey", "depth", "length"}``.

    The prompt (``passkey_prompt(context)``) holds at most ``length`` tokens by ``count``: the header,
    the needle and the question, plus as many filler sentences (seeded order, cycled if the text runs
    out) as fit. Depths are stratified: doc i's needle sits at a seeded depth in [k/n, (k+1)/n) of the
    filler, k = ``spread_order(n)[i]``: every part of the context is probed once per n docs, and any
    first few docs already spread over it. ``depth`` records where the needle landed (a sentence
    boundary).
    """
    sentence_cost = {s: count(" " + s) for s in filler}
    strata = spread_order(n_docs)
    docs = []
    for doc_id in range(n_docs):
        rng = rng_for(seed, "passkey", length, doc_id)
        passkey = str(10000 + below(rng, 90000))
        needle = NEEDLE.format(passkey=passkey)
        chosen = _fill(rng, filler, sentence_cost, length - count(passkey_prompt(f"{HEADER} {needle}")))
        depth = (strata[doc_id] + rng.random()) / n_docs
        at = round(depth * len(chosen))
        context = " ".join([HEADER, *chosen[:at], needle, *chosen[at:]])
        docs.append(
            {
                "id": doc_id,
                "context": context,
                "question": QUESTION,
                "passkey": passkey,
                "depth": round(at / max(len(chosen), 1), 4),
                "length": length,
            }
        )
    return docs


# ------------------------------------------------------------------------- long-context multiple choice

COLOUR_HEADER = (
    "The favourite colours of four people are hidden inside a lot of irrelevant text. Find them and "
    "memorize them. I will quiz you about one of them."
)
COLOUR_FACT = "The favourite colour of {name} is {colour}."
COLOUR_QUESTION = "What is the favourite colour of {name}? Answer:"
COLOUR_ANSWER = " The favourite colour of {name} is"  # the answer's start; a choice is " " + colour
NAMES = ("Alice", "Bruno", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "James", "Karen",
         "Leo", "Maria", "Nora", "Oscar", "Peter")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown")
COLOUR_FACTS = 4
_COLOUR_WORDS = re.compile(r"\b(" + "|".join(NAMES + COLOURS) + r")\b", re.IGNORECASE)


def colour_filler(sentences: Sequence[str]) -> list[str]:
    """Filler without digits, names or colour words: each fact is then the only place its words occur."""
    return [s for s in filler_sentences(sentences) if not _COLOUR_WORDS.search(s)]


def colour_prompt(doc: dict) -> str:
    """The prompt up to the choice: ``context``, the question, and the answer's start."""
    return f"{doc['context']}\n{doc['question']}{doc['answer_start']}"


def colour_docs(
    filler: Sequence[str],
    *,
    length: int,
    n_docs: int,
    seed: int,
    count: TokenCounter = chars_per_token_counter,
) -> list[dict]:
    """``{"id", "context", "question", "answer_start", "choices" (4), "label", "depth", "length"}``.

    Four distinct people with four distinct colours (seeded from ``NAMES`` / ``COLOURS``); their facts
    sit at sentence boundaries of filler chosen as in ``passkey_docs`` (``colour_prompt`` holds at most
    ``length`` tokens by ``count``). The asked fact's depth is stratified as the pass key's (``depth``);
    the other three land at uniform seeded depths. ``choices`` are the four colours with a leading space
    in a seeded order, ``label`` the asked person's."""
    sentence_cost = {s: count(" " + s) for s in filler}
    strata = spread_order(n_docs)
    docs = []
    for doc_id in range(n_docs):
        rng = rng_for(seed, "colours", length, doc_id)
        names = shuffled(rng, NAMES)[:COLOUR_FACTS]
        colours = shuffled(rng, COLOURS)[:COLOUR_FACTS]
        facts = [COLOUR_FACT.format(name=n, colour=c) for n, c in zip(names, colours, strict=True)]
        asked = below(rng, COLOUR_FACTS)
        question = COLOUR_QUESTION.format(name=names[asked])
        answer_start = COLOUR_ANSWER.format(name=names[asked])
        fixed = " ".join([COLOUR_HEADER, *facts]) + "\n" + question + answer_start
        chosen = _fill(rng, filler, sentence_cost, length - count(fixed))
        depths = [rng.random() for _ in facts]
        depths[asked] = (strata[doc_id] + rng.random()) / n_docs
        at = [round(d * len(chosen)) for d in depths]
        body: list[str] = []
        for i, sentence in enumerate([*chosen, None]):
            body += [fact for fact, where in zip(facts, at, strict=True) if where == i]
            if sentence is not None:
                body.append(sentence)
        order = shuffled(rng, range(COLOUR_FACTS))
        docs.append(
            {
                "id": doc_id,
                "context": " ".join([COLOUR_HEADER, *body]),
                "question": question,
                "answer_start": answer_start,
                "choices": [" " + colours[i] for i in order],
                "label": order.index(asked),
                "depth": round(at[asked] / max(len(chosen), 1), 4),
                "length": length,
            }
        )
    return docs
