"""A short ``afterburner train lla`` model for the engine tests, and what the training code's model answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

PAIRS, PROMPTS, MAX_TOKENS = 6, 12, 4
LOGPROB_ATOL = 2e-3  # CG (32 iterations, float32) in the engine against the training model's solve


def train_short(out: Path) -> Path:
    """The local-linear model of a 60-step run (seconds), as the CLI writes it."""
    run = subprocess.run([str(Path(sys.executable).with_name("afterburner")), "train", "lla", "--attention",
                          "local_linear", "--steps", "60", "--save-every", "60", "--eval-instances", "16",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "local_linear"


def mqar_prompts() -> list[list[int]]:
    """Token ids of PROMPTS seeded MQAR instances up to their first query key (the pairs, then the key)."""
    from afterburner.attention_backends.local_linear.tasks import mqar_batch

    batch = mqar_batch(batch=PROMPTS, pairs=PAIRS, generator=torch.Generator().manual_seed(2026))
    return batch.tokens[:, : 2 + 2 * PAIRS].tolist()


def reference(folder: Path, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[dict]:
    """Greedy continuations of the folder's model through the training code: tokens and their log-probs."""
    from afterburner.plugins.cli.lla_export import load_folder

    model, _ = load_folder(folder)
    results = []
    with torch.no_grad():
        for ids in prompts:
            tokens, logprobs = list(ids), []
            for _ in range(max_tokens):
                logits = model(torch.tensor([tokens]))[0, -1].log_softmax(-1)
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(logits[token]))
            results.append({"tokens": tokens[len(ids):], "logprobs": logprobs})
    return results
