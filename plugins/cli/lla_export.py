"""Hugging Face folders for the ``train lla`` models, and loading them back into ``TinyLlama``.

A folder holds ``config.json`` (``LlamaConfig``; LLA models add ``afterburner_local_linear_lambda``, one
float per layer), ``model.safetensors`` (LlamaForCausalLM names), a word-level tokenizer over the task
vocabulary (one token per word, ``<s>`` prepended, so ``"k3 v17 k5 v2 k3"`` is [<s>, k3, v17, k5, v2, k3]
and decodes back to the same words) and ``afterburner_training.json`` (the model shape and how it was
trained). Written to ``DIR.partial`` and renamed, so a folder is complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TRAINING_FILE = "afterburner_training.json"


def build_tokenizer():
    """PreTrainedTokenizerFast over ``tasks.VOCAB`` (ids = positions in VOCAB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from afterburner.attention_backends.local_linear import tasks

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(tasks.VOCAB)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                         special_tokens=[("<s>", tasks.BOS)])
    words.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def save_folder(model, folder: Path, *, training: dict) -> Path:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from afterburner.attention_backends.local_linear import tasks

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(**model.hf_config(bos_token_id=tasks.BOS, eos_token_id=tasks.EOS,
                                  pad_token_id=tasks.PAD)).save_pretrained(tmp)
    save_file(model.hf_state_dict(), tmp / "model.safetensors", metadata={"format": "pt"})
    build_tokenizer().save_pretrained(tmp)
    (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_folder(folder: Path):
    """(TinyLlama with the folder's weights and lambdas, the training record)."""
    import math

    import torch
    from safetensors.torch import load_file

    from afterburner.attention_backends.local_linear.model import LAMBDA_KEY, LlamaShape, TinyLlama

    record_path = folder / TRAINING_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{folder} is not a `train lla` folder (no {TRAINING_FILE})")
    record = json.loads(record_path.read_text())
    model = TinyLlama(LlamaShape(**record["shape"]))
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    missing = [name for name in missing if not name.endswith("log_lambda")]
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not fit its shape: missing {missing}, "
                         f"unexpected {unexpected}")
    lambdas = json.loads((folder / "config.json").read_text()).get(LAMBDA_KEY)
    if lambdas is not None:
        with torch.no_grad():
            for layer, lam in zip(model.model.layers, lambdas, strict=True):
                layer.self_attn.log_lambda.fill_(math.log(lam))
    model.eval()
    return model, record
