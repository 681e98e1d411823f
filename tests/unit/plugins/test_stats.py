"""The typed counters: one name per counter, reads added per layer-step, fallbacks said once and counted."""

from __future__ import annotations

import torch

from afterburner.attention_backends.batch_selection import ReadCounts
from afterburner.plugins import report, stats


def test_attention_counters_add_read_counts_and_report_them_with_the_selectors_own():
    totals = stats.attention("unit-test-method")
    totals.add(ReadCounts(pages_in_context=10, pages_read=4, tokens_in_context=160, tokens_read=50))
    totals.add(ReadCounts(pages_in_context=torch.tensor(6), pages_read=torch.tensor(2), tokens_in_context=0,
                          tokens_read=0))  # device counts (the GPU backend)
    counts = totals.as_dict()
    assert {key: counts.pop(key) for key in ("forward_calls", "pages_in_context", "pages_read", "tokens_in_context",
                                             "tokens_read")} == {"forward_calls": 2, "pages_in_context": 16,
                                                                 "pages_read": 6, "tokens_in_context": 160,
                                                                 "tokens_read": 50}
    assert set(counts.values()) == {0}, "the other counters are untouched"

    class Selector:
        def counters(self):
            return {"indexes_built": 3}

    stats.report_attention("unit-test-method", Selector())
    event = report.events()[-1]
    assert event["event"] == "unit-test-method_attention" and event["pages_read"] == 6
    assert event["indexes_built"] == 3


def test_a_fallback_is_logged_once_and_counted_every_time(monkeypatch):
    said = []
    monkeypatch.setattr(stats.logger, "warning", lambda message, *args: said.append(message % args))
    for _ in range(3):
        stats.fallback("unit test", "a layer with a sliding window")
    assert stats.FALLBACKS[("unit test", "a layer with a sliding window")] == 3
    assert said == ["unit test: a layer with a sliding window; the stock path runs there"]
