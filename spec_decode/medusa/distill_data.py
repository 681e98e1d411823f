"""Self-distillation data for Medusa heads: text files -> token chunks -> one frozen base-model pass.

Data files: ``.txt`` (each file is one document) or ``.jsonl`` (one document per line: a ``"text"`` field,
or chat ``"messages"`` rendered with the tokenizer's chat template). Documents are tokenised on their own
and cut into chunks of at most ``seq_len`` tokens, so the base model never attends across documents.
Plain text trains on every position; chat trains on the assistant turns only (all of it is context).

The base pass keeps only the final normed hidden states h [N, H] (what the lm_head reads): the training
targets are recomputed from them through the frozen lm_head (see train.py), which is exact and stores
H floats per token instead of a vocabulary-sized distribution. The pass runs once; ``load_or_build``
keys the cache by the model, the data files and the chunking, so later epochs and resumes reuse it.
With ``feature_layers`` the pass also keeps the hidden states those layers receive (HF
``output_hidden_states`` indices: entry i is the input of decoder layer i), what a drafter reading several
layers (hamburger/train.py) trains on: F x H more floats per token.
Needs ``transformers`` (imported inside the functions); no engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_VERSION = 2
BASE_PASS_TOKENS = 2048  # padded tokens per base-model batch: big enough for full matmuls, small in RAM


class DataError(ValueError):
    """Unreadable training data or base model; the message is one line."""


@dataclass(frozen=True)
class BasePass:
    hidden: torch.Tensor  # [N, H] float32: final normed hidden states, chunks back to back
    tokens: torch.Tensor  # [N] int64: the input tokens
    chunk_starts: torch.Tensor  # [C] int64: where each chunk begins in hidden / tokens
    chunk_lengths: torch.Tensor  # [C] int64
    trained: torch.Tensor  # [N] bool: positions to train and evaluate on (see tokenize_document)
    key: str  # what the pass was computed from (model, data, chunking)
    features: torch.Tensor | None = None  # [N, F, H] float32: hidden_states[i] for i in feature_layers


def progress_bar(**kwargs):
    """tqdm on stderr; in a log file (no terminal) one line every 30 s instead of ten a second."""
    import sys

    from tqdm import tqdm

    return tqdm(mininterval=0.5 if sys.stderr.isatty() else 30, **kwargs)


def read_documents(paths: list[str | Path], tokenizer) -> list[str | list[dict]]:
    """One entry per document: its text, or its chat messages (rendered by ``tokenize_document``)."""
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if path.suffix == ".txt":
            documents.append(path.read_text())
        elif path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if line.strip():
                    documents.append(_jsonl_document(path, number, line, tokenizer))
        else:
            raise DataError(f"data file {path}: expected a .txt or .jsonl file")
    if not documents:
        raise DataError(f"no documents in {', '.join(map(str, paths))}")
    return documents


def _jsonl_document(path: Path, number: int, line: str, tokenizer) -> str | list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: not JSON ({exc})") from None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if not tokenizer.chat_template:
            raise DataError(f"{path}:{number}: chat messages, but the tokenizer has no chat template")
        return record["messages"]
    raise DataError(f"{path}:{number}: expected an object with a 'text' string or a 'messages' list")


def tokenize_document(document: str | list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids, trained): ``trained[t]`` marks the positions whose hidden state drafts text the model
    writes. Plain text: every position. Chat: only positions t whose next token t+1 lies in an assistant
    turn, as Medusa drafts only there; the system prompt and user turns (a third of a short chat, and
    partly the same in every conversation) would otherwise fill training and flatter the agreement."""
    if isinstance(document, str):
        ids = tokenizer(document)["input_ids"]
        return ids, [True] * len(ids)

    def length(messages: list[dict], generation_prompt: bool) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    text = tokenizer.apply_chat_template(document, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    trained = [False] * len(ids)
    for i, message in enumerate(document):
        if message.get("role") == "assistant":
            start, end = length(document[:i], True), length(document[:i + 1], False)
            trained[max(start - 1, 0):end - 1] = [True] * max(0, end - 1 - max(start - 1, 0))
    return ids, trained[:len(ids)]


def chunk_documents(documents: list[str | list[dict]], tokenizer, *, seq_len: int,
                    max_tokens: int | None = None) -> list[tuple[list[int], list[bool]]]:
    """(ids, trained) chunks of at most ``seq_len`` tokens, in document order, ``max_tokens`` in all."""
    chunks, total = [], 0
    for document in documents:
        ids, trained = tokenize_document(document, tokenizer)
        for start in range(0, len(ids), seq_len):
            end = start + seq_len if max_tokens is None else min(start + seq_len, start + max_tokens - total)
            if len(ids[start:end]) >= 2:
                chunks.append((ids[start:end], trained[start:end]))
                total += len(chunks[-1][0])
            if max_tokens is not None and total >= max_tokens:
                return chunks
    return chunks


def load_base(base_dir: str | Path):
    """(model, tokenizer): the frozen base model in float32 on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar per load, in every log; our own bars say what is happening
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise DataError(f"base model folder {base_dir} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, tokenizer


def logit_softcap(model) -> float | None:
    """Gemma-style ``final_logit_softcapping`` (logits = c * tanh(logits / c)), if the model has one."""
    return getattr(model.config, "final_logit_softcapping", None) or None


@torch.inference_mode()
def run_base_pass(model, chunks: list[tuple[list[int], list[bool]]], *, key: str, progress: bool = True,
                  feature_layers: tuple[int, ...] = ()) -> BasePass:
    """Final normed hidden states of every (ids, trained) chunk, and with ``feature_layers`` the hidden
    states at those HF ``output_hidden_states`` indices; batches of similar length, right-padded."""
    lengths = torch.tensor([len(ids) for ids, _ in chunks])
    starts = torch.cumsum(lengths, 0) - lengths
    hidden = torch.empty(int(lengths.sum()), model.config.hidden_size)
    layers = list(feature_layers)
    features = torch.empty(int(lengths.sum()), len(layers), model.config.hidden_size) if layers else None
    order = sorted(range(len(chunks)), key=lambda c: -len(chunks[c][0]))  # similar lengths: little padding
    bar = progress_bar(total=int(lengths.sum()), unit="tok", desc="base pass", disable=not progress)
    i = 0
    while i < len(order):
        width = len(chunks[order[i]][0])
        batch = order[i:i + max(1, BASE_PASS_TOKENS // width)]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, c in enumerate(batch):
            ids[row, :lengths[c]] = torch.tensor(chunks[c][0])
            mask[row, :lengths[c]] = 1
        # base_model: the decoder stack without the lm_head; its last_hidden_state is after the final norm
        result = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers))
        out = result.last_hidden_state
        picked = torch.stack([result.hidden_states[i] for i in layers], 2) if layers else None  # [B, T, F, H]
        for row, c in enumerate(batch):
            hidden[starts[c]:starts[c] + lengths[c]] = out[row, :lengths[c]].float()
            if picked is not None:
                features[starts[c]:starts[c] + lengths[c]] = picked[row, :lengths[c]].float()
        bar.update(int(mask.sum()))
        i += len(batch)
    bar.close()
    tokens = torch.tensor([t for ids, _ in chunks for t in ids], dtype=torch.long)
    trained = torch.tensor([t for _, flags in chunks for t in flags], dtype=torch.bool)
    return BasePass(hidden, tokens, starts, lengths, trained, key, features)


def check_lm_head(model, chunk: list[int]) -> None:
    """Targets are recomputed as lm_head(h): make sure that is what this model's logits are."""
    ids = torch.tensor([chunk[:16]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]
        recomputed = hidden @ model.get_output_embeddings().weight.T
        if (cap := logit_softcap(model)) is not None:
            recomputed = cap * torch.tanh(recomputed / cap)
    if not torch.allclose(logits, recomputed, atol=1e-3, rtol=1e-3):
        raise DataError(f"{type(model).__name__}: logits are not lm_head(final hidden state) (a logit scale "
                        "or bias?); Medusa self-distillation here supports plain lm_heads only")


def cache_key(base_dir: Path, data_files: list[Path], *, seq_len: int, max_tokens: int | None,
              feature_layers: tuple[int, ...] = ()) -> str:
    layers = f" feature_layers={list(feature_layers)}" if feature_layers else ""  # Medusa keys as before
    digest = hashlib.sha256(f"v{CACHE_VERSION} seq_len={seq_len} max_tokens={max_tokens}{layers}\n".encode())
    for path in sorted(base_dir.iterdir()):  # weights by size and mtime: hashing them would take seconds
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    for path in data_files:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_or_build(model, tokenizer, base_dir: str | Path, data_files: list[str | Path], cache_file: Path, *,
                  seq_len: int, max_tokens: int | None, progress: bool = True,
                  feature_layers: tuple[int, ...] = ()) -> tuple[BasePass, bool]:
    """(base pass, whether it came from the cache). The cache file is replaced when its key differs.
    ``feature_layers``: also keep those layers' hidden states (``run_base_pass``)."""
    data_files = [Path(p) for p in data_files]
    for path in data_files:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
    key = cache_key(Path(base_dir), data_files, seq_len=seq_len, max_tokens=max_tokens,
                    feature_layers=tuple(feature_layers))
    if cache_file.is_file():
        cached = torch.load(cache_file, weights_only=True)
        if cached.get("key") == key:
            return BasePass(**cached), True
    chunks = chunk_documents(read_documents(data_files, tokenizer), tokenizer, seq_len=seq_len,
                             max_tokens=max_tokens)
    if not chunks:
        raise DataError("the data files hold no chunk of 2 or more tokens")
    check_lm_head(model, chunks[0][0])
    started = time.time()
    base = run_base_pass(model, chunks, key=key, progress=progress, feature_layers=tuple(feature_layers))
    if progress:
        seconds = time.time() - started
        print(f"[afterburner] base pass: {len(base.tokens)} tokens in {seconds:.0f} s", flush=True)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + ".partial")
    torch.save(base.__dict__, tmp)
    os.replace(tmp, cache_file)
    return base, False
