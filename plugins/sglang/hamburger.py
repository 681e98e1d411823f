"""The micro-step drafter (``spec_decode/hamburger``) as an afterburner proposer in SGLang (0.5.23), through
``spec_algorithms``:

    --speculative-algorithm AFTERBURNER_HAMBURGER (or HAMBURGER)  --speculative-draft-model-path DRAFTER_DIR
    [--speculative-num-draft-tokens N]    N tokens verified per request: the root + a chain of N - 1
                                          (default and most: the drafter's max_micro_steps + 1)
    AFTERBURNER_CONFIG='{"speculative": {"stop_threshold": 0.8}}'    (default: the drafter's own; 0: never stop)

Features. The drafter reads the target's residual stream at ``feature_layers`` (HF ``output_hidden_states``
indices: entry i is the input of decoder layer i) at each request's last accepted position. SGLang collects
such layers for its EAGLE-3 through the model's ``set_eagle3_layers_to_capture(ids)``, which captures the
input of layer id + 1 (llama.py: "for the ith layer, it takes the output of the (i-1)th layer"), so
ids = feature_layers - 1. With the capture on, the logits processor hands back the captured layers,
concatenated in layer order ([rows, F * H]), instead of the final hidden state, at the rows
``CaptureHiddenMode`` selects: the worker's ``hidden``. SGLang's runner switches the capture on at start for
its own EAGLE-3 only (``spec_aux_hidden_state`` resolves layer ids for ``is_eagle3()`` algorithms), so
``load_drafter`` calls the model's hook once the target is loaded, and prefill CUDA graphs are turned off
here (captured before that call, they would lack the capture; decode graphs are off for every proposer).

Draft length. ``MicroStepDrafter.draft`` ends each request's chain at its stop head's first P(accepted)
below the threshold. SGLang verifies one width N for all requests, so a chain that stopped early is cut
(``tree_verify``): the target computes its filler nodes, verification cannot accept them. In SGLang the
stop head therefore saves drafter micro-steps (the batch's drafting ends when every request has stopped),
not target compute; ``stop_threshold: 0`` drafts every chain to full length. ``draft`` returns Python lists
(variable lengths), so each draft stage syncs the device once, as the vLLM proposer does.

The drafter folder's config.json needs ``"model_type": "afterburner_hamburger"`` (``FOLDER_CONFIG``): SGLang
reads it with transformers' ``AutoConfig`` before any validator.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import PretrainedConfig

from afterburner.plugins.config import ConfigError, from_env
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang.proposers import drafting_vocabulary
from afterburner.plugins.sglang.tree_verify import FILLER_TOKEN, Drafts
from afterburner.spec_decode.hamburger.checkpoint import CheckpointError, read_config
from afterburner.spec_decode.hamburger.checkpoint import load_drafter as load_drafter_folder
from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.tree import TokenTree

logger = get_logger(__name__)


@functools.lru_cache(maxsize=8)
def drafter_config(draft_path: str | None) -> DrafterConfig:
    """The config of the drafter in ``--speculative-draft-model-path``, or one ``ConfigError`` line."""
    if not draft_path:
        raise ConfigError("--speculative-algorithm AFTERBURNER_HAMBURGER needs --speculative-draft-model-path: the "
                          "micro-step drafter folder (build one with `afterburner train hamburger`)")
    try:
        return read_config(draft_path)[0]
    except CheckpointError as exc:
        raise ConfigError(f"--speculative-draft-model-path: {exc}") from None


def max_depth(server_args: Any) -> int:
    """How many tokens the drafter drafts at most (argument checks, the user's process)."""
    config = drafter_config(server_args.speculative_draft_model_path)
    drafting_vocabulary(server_args.speculative_draft_model_path, config.vocab_size)  # one line if it does not fit
    steps = config.max_micro_steps
    num = server_args.speculative_num_draft_tokens
    if num is not None and num - 1 > steps:
        raise ConfigError(f"--speculative-num-draft-tokens: {num} is the root + {num - 1} drafted tokens, more than "
                          f"the drafter's max_micro_steps {steps}; give at most {steps + 1}")
    return steps


def handle_server_args(server_args: Any) -> None:
    """After the shared defaults: no prefill CUDA graphs (captured before ``load_drafter`` switches on the
    feature capture, they would return the final hidden state)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    server_args.cuda_graph_config = with_phase(server_args.cuda_graph_config, Phase.PREFILL,
                                               backend=Backend.DISABLED)


def capture_ids(feature_layers: tuple[int, ...]) -> list[int]:
    """``set_eagle3_layers_to_capture`` ids that make SGLang capture the inputs of ``feature_layers``."""
    return [layer - 1 for layer in feature_layers]


class HamburgerDrafter:
    """The micro-step drafter (float32, on the target's device) and the chain it fills."""

    def __init__(self, drafter: MicroStepDrafter, tree: TokenTree, stop_threshold: float):
        self.drafter = drafter
        self.tree = tree
        self.stop_threshold = stop_threshold
        layers = drafter.config.feature_layers
        # SGLang packs the captured layers in layer order; the drafter reads them in feature_layers order
        self.feature_order = torch.tensor([sorted(layers).index(layer) for layer in layers])

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, roots: torch.Tensor) -> Drafts:
        """Each request's greedy chain from the captured layers hidden [B, F * H] at position t and the token
        sampled there, roots [B] (x_{t+1}): head_topk [B, D, 1], its first depths[b] tokens drafted."""
        c = self.drafter.config
        features = hidden.reshape(-1, len(c.feature_layers), c.base_hidden_size)[:, self.feature_order]  # [B, F, H]
        chains = self.drafter.draft(features.float(), roots, max_tokens=self.tree.depth,
                                    stop_threshold=self.stop_threshold)
        depth = self.tree.depth
        padded = [chain + [FILLER_TOKEN] * (depth - len(chain)) for chain in chains]
        head_topk = torch.tensor(padded, dtype=torch.long).reshape(len(chains), depth, 1).to(hidden.device)
        depths = torch.tensor([len(chain) for chain in chains], dtype=torch.long, device=hidden.device)
        return Drafts(head_topk, depths)


def load_drafter(server_args: Any, runner: Any, tree: TokenTree) -> HamburgerDrafter:
    """In the scheduler: the drafter on the target's device, checked against the target, on its embedding
    and LM head; the target captures the drafter's feature layers from now on."""
    folder = server_args.speculative_draft_model_path
    try:
        drafter = load_drafter_folder(folder)
    except CheckpointError as exc:
        raise RuntimeError(f"--speculative-draft-model-path: {exc}") from None
    c, target = drafter.config, runner.model_config
    if (c.base_hidden_size, c.vocab_size) != (target.hidden_size, target.vocab_size):
        raise RuntimeError(f"--speculative-draft-model-path: a drafter for (hidden, vocabulary) size "
                           f"{(c.base_hidden_size, c.vocab_size)} does not fit the target's "
                           f"{(target.hidden_size, target.vocab_size)}")
    if max(c.feature_layers) >= target.num_hidden_layers:
        raise RuntimeError(f"--speculative-draft-model-path: feature_layers {list(c.feature_layers)} reach past the "
                           f"target's {target.num_hidden_layers} layers (SGLang captures layer inputs 1.."
                           f"{target.num_hidden_layers - 1})")
    from sglang.srt.runtime_context import get_parallel

    model, tp_size = runner.model, get_parallel().tp_size
    if not hasattr(model, "set_eagle3_layers_to_capture") or tp_size > 1:
        raise RuntimeError(f"--speculative-algorithm AFTERBURNER_HAMBURGER needs a target with SGLang's EAGLE-3 "
                           f"layer capture and tensor parallel size 1; {type(model).__name__} at tp "
                           f"{tp_size} is not")
    model.set_eagle3_layers_to_capture(capture_ids(c.feature_layers))
    embed, lm_head = model.model.embed_tokens.weight, model.lm_head.weight  # [V_padded, H]
    draft_ids = drafting_vocabulary(folder, c.vocab_size)  # micro-steps score only these tokens
    drafter = drafter.to(runner.device).attach_base(embed.detach()[: c.vocab_size].float(),
                                                    lm_head.detach()[: c.vocab_size].float(), draft_ids)
    threshold = from_env().speculative.stop_threshold
    threshold = c.stop_threshold if threshold is None else threshold
    logger.info("hamburger: micro-step drafter from %s, features of layers %s, chains of up to %d tokens, stop "
                "below P(accepted) %.2f, drafting from %s tokens", folder, list(c.feature_layers), tree.depth,
                threshold, "all" if draft_ids is None else draft_ids.numel())
    return HamburgerDrafter(drafter, tree, threshold)


class HamburgerFolderConfig(PretrainedConfig):
    """Lets transformers read a drafter folder's config.json (see the module docstring)."""

    model_type = "afterburner_hamburger"


FOLDER_CONFIG = HamburgerFolderConfig
