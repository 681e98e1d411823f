"""EAGLE-3 drafter folders in the layout vLLM's ``"method": "eagle3"`` loads (``llama_eagle3.py``).

    config.json         a Llama config with ``architectures: ["LlamaForCausalLMEagle3"]``, one hidden layer,
                        ``fc_norm: true`` (one RMSNorm per feature before fc), ``eagle_config.
                        eagle_aux_hidden_state_layer_ids`` = the feature layers (HF hidden_states indices,
                        which vLLM's aux hidden states use too), ``draft_vocab_size``; afterburner's
                        ``afterburner_eagle3`` entry holds the drafter config and training provenance
    model.safetensors   fc, fc_norm.*, midlayer.*, norm; with a drafting vocabulary of N tokens also
                        ``lm_head.weight`` [N, H] (the base's rows) and ``d2t`` [N] (target id - draft id);
                        without one, no lm_head and no embedding: vLLM shares the target's
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.hamburger.drafter import DrafterConfig
from afterburner.spec_decode.medusa.checkpoint import WEIGHTS, write_folder
from afterburner.spec_decode.stop_head import StopHead

MARKER = "afterburner_eagle3"
ARCHITECTURE = "LlamaForCausalLMEagle3"


class Eagle3FolderError(ValueError):
    """An EAGLE-3 folder that cannot be read; the message is one line."""


def save_eagle3(folder: str | Path, drafter: Eagle3Drafter, *, max_position_embeddings: int,
                vocab_ids: torch.Tensor | None = None, provenance: dict | None = None) -> Path:
    """Write ``drafter`` (attached to its base) for vLLM; ``vocab_ids`` [N]: draft from these tokens only."""
    c = drafter.config
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in drafter.state_dict().items()}
    if vocab_ids is not None:
        vocab_ids = vocab_ids.long().cpu()
        tensors["lm_head.weight"] = drafter.lm_head_weight[vocab_ids].float().cpu().contiguous()
        tensors["d2t"] = vocab_ids - torch.arange(len(vocab_ids))
    config = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": c.hidden_size,
        "num_hidden_layers": 1, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "hidden_act": "silu",
        "vocab_size": c.vocab_size, "draft_vocab_size": c.vocab_size if vocab_ids is None else len(vocab_ids),
        "target_hidden_size": c.base_hidden_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False, "dtype": "float32",
        "fc_norm": True,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.feature_layers), "use_aux_hidden_state": True},
        MARKER: {"drafter": c.to_dict(), "training": provenance},
    }
    return write_folder(folder, tensors, config)


def load_eagle3(folder: str | Path) -> tuple[Eagle3Drafter, torch.Tensor | None]:
    """(the drafter, not attached to a base; its drafting vocabulary [N] or None) from an afterburner
    EAGLE-3 folder."""
    from safetensors.torch import load_file

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise Eagle3FolderError(f"{folder} has no config.json")
    raw = json.loads(path.read_text())
    if MARKER not in raw:
        raise Eagle3FolderError(f"{path} is not an afterburner EAGLE-3 folder (no {MARKER!r} entry)")
    state = load_file(str(Path(folder) / WEIGHTS))
    d2t = state.pop("d2t", None)
    state.pop("lm_head.weight", None)  # the base's rows: the reference attaches the whole LM head, drafts by ids
    drafter = Eagle3Drafter(DrafterConfig.from_dict(raw[MARKER]["drafter"]))
    drafter.load_state_dict(state)
    vocab_ids = None if d2t is None else d2t + torch.arange(len(d2t))
    return drafter.eval(), vocab_ids


def with_draft_vocab(folder: str | Path, out: str | Path, vocab_ids: torch.Tensor, lm_head: torch.Tensor) -> Path:
    """A copy of an EAGLE-3 folder that drafts from ``vocab_ids`` only (``lm_head`` [V, H]: the base's)."""
    drafter, _ = load_eagle3(folder)
    drafter.attach_base(lm_head, lm_head)  # the embedding is not saved; only the LM head's rows are
    raw = json.loads((Path(folder) / "config.json").read_text())
    return save_eagle3(out, drafter, max_position_embeddings=raw["max_position_embeddings"], vocab_ids=vocab_ids,
                       provenance={**(raw[MARKER].get("training") or {}), "draft_vocab_of": str(folder)})


# A stop head fitted on an EAGLE-3 folder (``stop_train.py``) lives in that folder's ``stop_head/`` (vLLM's
# loader reads only the top level's weights), with the digest of the drafter weights it was fitted on.
STOP_HEAD = "stop_head"
STOP_MARKER = "afterburner_stop_head"


def weights_digest(folder: str | Path) -> str:
    """sha256 of an EAGLE-3 folder's weights file (what a stop head is tied to)."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def save_stop_head(folder: str | Path, head: StopHead, *, provenance: dict | None = None) -> Path:
    """Write ``head`` into the EAGLE-3 folder ``folder`` (its ``stop_head/``, replaced whole)."""
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in head.state_dict().items()}
    config = {STOP_MARKER: {"hidden_size": head.hidden_size, "width": head.width,
                            "drafter_sha256": weights_digest(folder), "training": provenance}}
    return write_folder(Path(folder) / STOP_HEAD, tensors, config)


def load_stop_head(folder: str | Path) -> StopHead:
    """The stop head fitted on the EAGLE-3 folder ``folder``; an Eagle3FolderError line when there is none
    or when it was fitted on other drafter weights."""
    from safetensors.torch import load_file

    path = Path(folder) / STOP_HEAD / "config.json"
    if not path.is_file():
        raise Eagle3FolderError(f"{folder} has no stop head ({STOP_HEAD}/): fit one with `afterburner train "
                                f"eagle3-stop --eagle3 {folder} ...`")
    meta = json.loads(path.read_text()).get(STOP_MARKER)
    if not isinstance(meta, dict):
        raise Eagle3FolderError(f"{path} is not an afterburner stop head (no {STOP_MARKER!r} entry)")
    if meta.get("drafter_sha256") != weights_digest(folder):
        raise Eagle3FolderError(f"{path} was fitted on other drafter weights than {folder}'s {WEIGHTS}: fit it "
                                "again (`afterburner train eagle3-stop`)")
    head = StopHead(int(meta["hidden_size"]), int(meta["width"]))
    head.load_state_dict(load_file(str(path.parent / WEIGHTS)))
    return head.eval()


def draft_vocab_copy(folder: str | Path, ranking_folder: str | Path, size: int, lm_head: torch.Tensor) -> Path:
    """``folder``'s copy drafting from the first ``size`` tokens ``ranking_folder``'s draft_vocab.safetensors
    ranks (``train draft-vocab``), beside it as FOLDER-vocabSIZE; written when missing or older than
    ``folder`` (then any stop head in it is gone with it: it was fitted on the old copy)."""
    from afterburner.spec_decode import draft_vocab

    folder = Path(folder)
    out = folder.with_name(f"{folder.name}-vocab{size}")
    if not (out / "config.json").is_file() or \
            (out / "config.json").stat().st_mtime < (folder / "config.json").stat().st_mtime:
        with_draft_vocab(folder, out, draft_vocab.load(ranking_folder, size, lm_head.shape[0]), lm_head)
    return out
