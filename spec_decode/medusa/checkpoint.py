"""Medusa head checkpoints: the folder format that vLLM's built-in Medusa loads, and FasterDecoding's.

Written (``save_heads``), for ``--speculative-config '{"method": "medusa", "model": FOLDER, ...}'``:

    config.json         model_type "medusa", num_heads, num_hidden_layers (residual layers per head),
                        hidden_size, vocab_size, medusa_fc_bias, original_lm_head, plus an "afterburner"
                        section (shared_lm_head, base model, training provenance)
    model.safetensors   blocks.{i}.layers.{j}.weight / .bias  [H, H] / [H]
                        lm_heads.{i}.weight                    [V, H]  (own lm_heads), or
                        lm_heads.0.weight                      [V, H]  the base lm_head (shared lm_head:
                        vLLM 0.32's Medusa.load_weights maps it to its one ``lm_head`` when
                        ``original_lm_head`` is true, and fails on a missing weight)

Read (``load_heads``): that format, and FasterDecoding/Medusa's: config.json with medusa_num_heads /
medusa_num_layers / base_model_name_or_path, weights ``medusa_lm_head.safetensors`` or
``medusa_lm_head.pt`` keyed ``{head}.{layer}.linear.weight|bias`` and ``{head}.{num_layers}.weight``
(their ``nn.Sequential(*res_blocks, lm_head)`` per head); hidden and vocab sizes come from the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads
from afterburner.spec_decode.tree_plan import Acceptance

WEIGHTS = "model.safetensors"
FD_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A Medusa checkpoint folder that cannot be read or written; the message is one line."""


def save_heads(heads: MedusaHeads, folder: str | Path, *, base_model: str | Path | None = None,
               lm_head_weight: torch.Tensor | None = None, provenance: dict | None = None) -> Path:
    """Write ``heads`` to ``folder`` (replaced whole: written beside it, then renamed).

    ``lm_head_weight`` [V, H] is the base model's lm_head, required for shared-lm_head heads (vLLM loads it
    as the heads' lm_head). ``provenance`` (JSON-able) lands in config.json under afterburner.training."""
    config = heads.config
    if config.shared_lm_head and lm_head_weight is None:
        raise CheckpointError("save_heads: these heads share the base lm_head; pass lm_head_weight "
                              "(vLLM loads it from lm_heads.0.weight)")
    if lm_head_weight is not None and tuple(lm_head_weight.shape) != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"save_heads: lm_head_weight has shape {tuple(lm_head_weight.shape)}, expected "
                              f"[vocab_size, hidden_size] = {[config.vocab_size, config.hidden_size]}")

    tensors = {name: t.detach().cpu().contiguous() for name, t in heads.state_dict().items()}
    if config.shared_lm_head:
        # clone: a tied embedding shares storage with the base model, which safetensors refuses
        tensors["lm_heads.0.weight"] = lm_head_weight.detach().cpu().to(_dtype_of(heads)).contiguous().clone()
    hf_config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "medusa_fc_bias": config.bias,
        "original_lm_head": config.shared_lm_head,
        "dtype": str(_dtype_of(heads)).removeprefix("torch."),
        "afterburner": {
            "format_version": FORMAT_VERSION,
            "shared_lm_head": config.shared_lm_head,
            "base_model": None if base_model is None else str(base_model),
            "training": provenance,
        },
    }
    return write_folder(folder, tensors, hf_config)


def write_folder(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A drafter folder (``model.safetensors`` + ``config.json``) replaced whole: written beside it, then
    renamed, so a reader finds the old folder or the new one, never half of one."""
    from safetensors.torch import save_file

    final = Path(folder)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_heads(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> MedusaHeads:
    """Medusa heads from an afterburner/vLLM folder or a FasterDecoding one (detected from config.json).

    Shared-lm_head heads come back without their lm_head: get it with ``load_shared_lm_head``."""
    folder, config = _read_config(folder)
    if "medusa_num_heads" in config:
        heads_config, state = _fasterdecoding(folder, config)
    elif config.get("model_type") == "medusa" and "num_heads" in config:
        heads_config, state = _vllm(folder, config)
        if heads_config.shared_lm_head:
            state.pop("lm_heads.0.weight", None)  # the base lm_head: see load_shared_lm_head
    else:
        raise CheckpointError(
            f"{folder}/config.json is not a Medusa checkpoint: expected model_type 'medusa' with num_heads "
            f"and num_hidden_layers (vLLM/afterburner) or medusa_num_heads and medusa_num_layers "
            f"(FasterDecoding); found keys {sorted(config)}")
    heads = MedusaHeads(heads_config)
    _check_shapes(folder, heads, state)
    heads.load_state_dict(state)
    return heads.to(dtype)


def load_shared_lm_head(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The base lm_head weight [V, H] stored with shared-lm_head heads; None for heads with their own."""
    folder, config = _read_config(folder)
    if not config.get("original_lm_head", False):
        return None
    weight = _read_tensors(_weights_file(folder, (WEIGHTS,))).get("lm_heads.0.weight")
    if weight is None:
        raise CheckpointError(f"{folder}/{WEIGHTS} lacks lm_heads.0.weight although original_lm_head is true")
    return weight.to(dtype)


def measured_acceptance(folder: str | Path) -> Acceptance | None:
    """The held-out acceptance ``afterburner train medusa`` stored in the folder's config.json (what
    ``speculative.tree: "measured"`` drafts from); None for heads trained elsewhere or before it was stored."""
    _, config = _read_config(folder)
    stored = ((config.get("afterburner") or {}).get("training") or {}).get("holdout_tree")
    return Acceptance.from_dict(stored) if stored else None


def _dtype_of(heads: MedusaHeads) -> torch.dtype:
    return next(heads.parameters()).dtype


def _read_config(folder: str | Path) -> tuple[Path, dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Medusa checkpoint folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Medusa checkpoint folder?")
    try:
        return folder, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def _weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has no weights file: expected {' or '.join(names)}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _vllm(folder: Path, config: dict) -> tuple[HeadsConfig, dict]:
    raw = _read_tensors(_weights_file(folder, (WEIGHTS,)))
    state = {name.removeprefix("medusa_heads."): t for name, t in raw.items()}
    state.pop("token_map", None)  # vLLM's optional draft-vocab truncation; our heads use the full vocabulary
    heads_config = HeadsConfig(
        hidden_size=int(config["hidden_size"]), vocab_size=int(config["vocab_size"]),
        num_heads=int(config["num_heads"]), num_layers=int(config.get("num_hidden_layers", 1)),
        shared_lm_head=bool(config.get("original_lm_head", False)),
        bias=bool(config.get("medusa_fc_bias", False)))
    return heads_config, state


_FD_KEY = re.compile(r"^(\d+)\.(\d+)\.(?:linear\.)?(weight|bias)$")


def _fasterdecoding(folder: Path, config: dict) -> tuple[HeadsConfig, dict]:
    raw = _read_tensors(_weights_file(folder, FD_WEIGHTS))
    num_heads, num_layers = int(config["medusa_num_heads"]), int(config.get("medusa_num_layers", 1))
    state = {}
    for name, tensor in raw.items():
        match = _FD_KEY.match(name)
        if match is None:
            raise CheckpointError(f"{folder}: unexpected FasterDecoding weight {name!r}; expected "
                                  "'{head}.{layer}.linear.weight|bias' or '{head}.{num_layers}.weight'")
        head, layer, param = int(match[1]), int(match[2]), match[3]
        if layer == num_layers:
            state[f"lm_heads.{head}.{param}"] = tensor
        else:
            state[f"blocks.{head}.layers.{layer}.{param}"] = tensor
    first_block, first_head = state.get("blocks.0.layers.0.weight"), state.get("lm_heads.0.weight")
    if first_block is None or first_head is None:
        raise CheckpointError(f"{folder}: FasterDecoding weights lack '0.0.linear.weight' or "
                              f"'0.{num_layers}.weight' (medusa_num_layers={num_layers} in config.json)")
    heads_config = HeadsConfig(
        hidden_size=first_block.shape[1], vocab_size=first_head.shape[0], num_heads=num_heads,
        num_layers=num_layers, shared_lm_head=False, bias="blocks.0.layers.0.bias" in state)
    return heads_config, state


def _check_shapes(folder: Path, heads: MedusaHeads, state: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(t.shape) for name, t in heads.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match config.json ({heads.config}): "
                              f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                              f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{folder}: shape mismatch for {name}: file has {list(state[name].shape)}, "
                                  f"config.json implies {list(shape)}")
