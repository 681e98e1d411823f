"""Drafts derived from a target Hugging Face Llama-family folder, for draft-based methods when no smaller model
shares the target's tokenizer (SmolLM2-135M and Gemma-3-270M share none):

- ``layers=N``: the first N decoder layers, then the target's final norm and LM head (an early exit);
- ``int4``: every decoder-layer linear weight fake-quantised to symmetric int4 per group of ``group_size``
  consecutive input channels (scale = max|w| / 7 per group, codes in [-7, 7], stored back as float32, so the
  engines load it as a plain model). Embeddings, norms and the LM head stay as they are.

The folder gets config.json, model.safetensors and the target's other files (tokenizer, chat template,
generation config) copied unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

INT4_GROUP_SIZE = 32  # input channels per scale: GGUF Q4_0's block; finer than GPTQ/AWQ's usual 128
INT4_MAX = 7  # symmetric codes -7..7 (int4's -8 unused, so the grid is symmetric around 0)
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
AGREEMENT_PROMPTS = (
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Here are three tips for a good night's sleep:\n1.",
)


def fake_quant_int4(weight: torch.Tensor, *, group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """weight: [out, in] with in % group_size == 0 -> the same shape and dtype, each group of group_size input
    channels rounded to scale * round(w / scale), scale = max|w| / 7. Error per entry <= scale / 2."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide {in_features} input channels")
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT4_MAX
    codes = torch.round(groups / scale).clamp(-INT4_MAX, INT4_MAX)
    return (codes * scale).reshape(out_features, in_features).to(weight.dtype)


def _copy_side_files(src: Path, out: Path) -> None:
    for item in src.iterdir():
        if item.is_file() and item.name != "config.json" and not item.name.startswith(".") \
                and not item.name.endswith(_WEIGHT_FILES) and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)


def derive_draft(src: str | Path, out: str | Path, *, layers: int | None = None, int4: bool = False,
                 group_size: int = INT4_GROUP_SIZE) -> Path:
    """Write a draft folder at ``out`` from the target at ``src`` (exactly one of layers / int4)."""
    from transformers import AutoModelForCausalLM

    if (layers is None) == (not int4):
        raise ValueError("derive_draft: give exactly one of layers=N or int4=True")
    src, out = Path(src), Path(out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    decoder = model.model.layers
    if layers is not None:
        if not 1 <= layers <= len(decoder):
            raise ValueError(f"--layers must be in 1..{len(decoder)} for {src}, got {layers}")
        model.model.layers = decoder[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):  # per-layer attention kinds (sliding / full)
            model.config.layer_types = model.config.layer_types[:layers]
    else:
        with torch.no_grad():
            for module in decoder.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(fake_quant_int4(module.weight, group_size=group_size))
        model.config.afterburner_draft = {"int4_group_size": group_size}
    if layers is not None:
        model.config.afterburner_draft = {"layers": layers, "of": len(decoder)}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    _copy_side_files(src, out)
    return out


def cached_layer_draft(model: str | Path, layers: int) -> Path:
    """The draft of ``model``'s first ``layers`` layers in the cache folder beside the model's
    (``<cache>/drafts/<name>-l<layers>``), derived on first use (seconds)."""
    return _cached_draft(Path(model), f"l{layers}", layers=layers)


def cached_int4_draft(model: str | Path) -> Path:
    """``model`` with int4 fake-quantised weights (``<cache>/drafts/<name>-int4``), derived on first use."""
    return _cached_draft(Path(model), "int4", int4=True)


def _cached_draft(model: Path, suffix: str, **derive) -> Path:
    draft = model.parent.parent / "drafts" / f"{model.name}-{suffix}"
    if not (draft / "config.json").is_file():
        print(f"[afterburner] deriving the draft {draft} ...", flush=True)
        derive_draft(model, draft, **derive)
    return draft


def greedy_agreement(target_dir: str | Path, draft_dir: str | Path, *, prompts: Sequence[str] = AGREEMENT_PROMPTS,
                     new_tokens: int = 32) -> float:
    """Share of the target's greedy continuation tokens that the draft predicts as its own argmax, given the
    same (target-written) prefix: the per-token acceptance of greedy draft-then-verify, teacher-forced."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    agree = total = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            full = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                   pad_token_id=tokenizer.eos_token_id)
            prompt_len = ids.shape[1]
            target_next = full[0, prompt_len:]  # [T]: the target's greedy tokens
            draft_next = draft(full[:, :-1]).logits[0, prompt_len - 1:].argmax(-1)  # [T]
            agree += int((draft_next == target_next).sum())
            total += target_next.numel()
    return agree / total
