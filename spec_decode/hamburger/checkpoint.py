"""Micro-step drafter folders, and the base model's embedding and LM head the drafter runs on.

A drafter folder (``save_drafter`` / ``load_drafter``):

    config.json         {"afterburner_drafter": "hamburger", "format_version": 1, <DrafterConfig fields>,
                         "training": {...} (optional provenance)}
    model.safetensors   the drafter's own weights only (fc_in, layers, norm, fc_out, stop_head); the base
                        embedding and LM head are not stored: ``load_base_embeddings(base_dir)`` reads them
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.medusa.checkpoint import WEIGHTS, write_folder

MARKER = "afterburner_drafter"
FORMAT_VERSION = 1


MODEL_TYPE = "afterburner_hamburger"  # what transformers' AutoConfig finds (SGLang reads every draft folder so)


class CheckpointError(ValueError):
    """A drafter folder or base model that cannot be read or written; the message is one line."""


def save_drafter(folder: str | Path, drafter: MicroStepDrafter, *, provenance: dict | None = None) -> Path:
    """Write ``drafter`` to ``folder`` (replaced whole: written beside it, then renamed)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in drafter.state_dict().items()}
    config = {MARKER: "hamburger", "model_type": MODEL_TYPE, "format_version": FORMAT_VERSION,
              **drafter.config.to_dict()}
    if provenance is not None:
        config["training"] = provenance
    return write_folder(folder, tensors, config)


def read_config(folder: str | Path) -> tuple[DrafterConfig, dict | None]:
    """(config, training provenance or None) from a drafter folder's config.json."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise CheckpointError(f"drafter folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a hamburger drafter folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get(MARKER) != "hamburger":
        raise CheckpointError(f"{path} is not a hamburger drafter config (no \"{MARKER}\": \"hamburger\")")
    raw = dict(raw)
    raw.pop(MARKER)
    raw.pop("model_type", None)  # for hosts that read the folder with transformers' AutoConfig (SGLang)
    version = raw.pop("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version}, this afterburner reads {FORMAT_VERSION}")
    training = raw.pop("training", None)
    try:
        return DrafterConfig.from_dict(raw), training
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_drafter(folder: str | Path, dtype: torch.dtype = torch.float32) -> MicroStepDrafter:
    """The drafter in ``folder``, in eval mode, not attached to a base (see ``attach_base``)."""
    from safetensors.torch import load_file

    config, _ = read_config(folder)
    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS}")
    state = load_file(str(weights))
    drafter = MicroStepDrafter(config)
    expected = {name: tuple(t.shape) for name, t in drafter.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: weights do not match config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{weights}: {name} has shape {list(state[name].shape)}, config.json implies "
                                  f"{list(shape)}")
    drafter.load_state_dict(state)
    return drafter.to(dtype).eval()


def load_base_embeddings(base_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed [V, H], lm_head [V, H]) from a Hugging Face Llama-like folder's safetensors; a tied model
    (no ``lm_head.weight``) gives the embedding twice."""
    from safetensors import safe_open

    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise CheckpointError(f"base model folder {base_dir} does not exist")
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"base model folder {base_dir} has no .safetensors weights")
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                    found["lm_head" if name == "lm_head.weight" else "embed"] = f.get_tensor(name)
    if "embed" not in found:
        raise CheckpointError(f"{base_dir}: no '*embed_tokens.weight' in its safetensors")
    return found["embed"], found.get("lm_head", found["embed"])
