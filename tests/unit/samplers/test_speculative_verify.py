"""AWRS as the verifier of a speculative chain (``samplers.speculative.verify_chain``) against AWRS alone,
on a toy target whose logits depend on the whole prefix: the emitted sequence is the same token for token
(greedy, and sampled with the same seed: one draw of the generator per emitted token either way), drafts
are accepted when they fit, and a draft the constraint forbids is never accepted."""

import torch

from afterburner.samplers.speculative import verify_chain

VOCAB, EOS = 12, 11


def target_logits(prefix: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(hash(tuple(prefix)) % (2**31))
    return torch.randn(VOCAB, generator=generator) * 2


def allowed(prefix: list[int], token: int) -> bool:
    """No token twice in a row, no odd token after an odd one; EOS after 6 tokens."""
    if token == EOS:
        return len(prefix) >= 6
    return not prefix or (token != prefix[-1] and not (token % 2 and prefix[-1] % 2))


def sampler(temperature: float | None, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def draw(logits: torch.Tensor, prefix: list[int]) -> int:
        mask = torch.tensor([allowed(prefix, t) for t in range(VOCAB)])
        masked = logits.masked_fill(~mask, float("-inf"))
        if temperature is None:
            return int(masked.argmax())
        return int(torch.multinomial(torch.softmax(masked / temperature, -1), 1, generator=generator))

    return draw


def alone(temperature, seed, length=16) -> list[int]:
    draw, out = sampler(temperature, seed), []
    while len(out) < length and (not out or out[-1] != EOS):
        out.append(draw(target_logits(out), out))
    return out


def speculative(temperature, seed, drafter, length=16) -> tuple[list[int], int]:
    draw, out, accepted = sampler(temperature, seed), [], 0
    while len(out) < length and (not out or out[-1] != EOS):
        drafts = drafter(out)
        logits = torch.stack([target_logits(out + drafts[:j]) for j in range(len(drafts) + 1)])
        step = verify_chain(draw, logits, out, drafts, EOS)
        accepted += len(step) - 1
        out += step
    return out[:length] if EOS not in out else out[: out.index(EOS) + 1], accepted


def greedy_drafter(n):
    """Drafts the target's unconstrained argmax chain: often allowed, sometimes not."""
    def drafter(prefix):
        drafts = []
        for _ in range(n):
            drafts.append(int(target_logits(prefix + drafts).argmax()))
        return drafts
    return drafter


def test_greedy_output_equals_awrs_alone_and_drafts_are_accepted():
    for seed in range(5):
        expected = alone(None, seed)
        got, accepted = speculative(None, seed, greedy_drafter(3))
        assert got == expected
    assert accepted > 0


def test_seeded_sampling_equals_awrs_alone_token_for_token():
    total = 0
    for seed in range(20):
        got, accepted = speculative(1.0, seed, greedy_drafter(3))
        assert got == alone(1.0, seed)
        total += accepted
    assert total > 0


def test_a_forbidden_draft_is_never_accepted():
    prefix = [2]
    drafts = [2, 4]  # 2 after 2 is forbidden
    logits = torch.full((3, VOCAB), -10.0)
    logits[:, 2] = 10.0  # the target loves the forbidden token
    step = verify_chain(sampler(None, 0), logits, prefix, drafts, EOS)
    assert len(step) == 1 and step[0] != 2 and allowed(prefix, step[0])
