"""``--speculative-algorithm AFTERBURNER_DRAFT`` (a draft model) on the real sglang modules: SGLang's plugin
loader registers it; SGLang's argument resolution applies the tree's defaults and stops on bad settings with
one line. Engine runs: ``test_sglang_speculative_engine.py``."""

import pytest
from spec_args import assert_refused, assert_registered, resolve

from afterburner.spec_decode.draft.derive import derive_draft

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="module")
def draft_dir(tiny_model, tmp_path_factory):
    return derive_draft(tiny_model, tmp_path_factory.mktemp("draft") / "l1", layers=1)


def test_loader_registers_it(loaded):
    assert_registered("AFTERBURNER_DRAFT")


@pytest.mark.parametrize("flags, config, nodes, depth", [
    ([], None, 5, 2),  # the paper's tree (afterburner.speculative.tree's default) of 4 drafted nodes
    (["--speculative-num-draft-tokens", "4"], None, 4, 2),
    (["--speculative-num-draft-tokens", "5"], '{"speculative": {"tree": "chain"}}', 5, 4),  # as deep as asked
])
def test_resolution_applies_the_trees_defaults(loaded, draft_dir, tiny_model, monkeypatch, flags, config, nodes,
                                               depth):
    if config is None:
        monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    else:
        monkeypatch.setenv("AFTERBURNER_CONFIG", config)
    _, view = resolve(tiny_model, "--speculative-algorithm", "AFTERBURNER_DRAFT", "--speculative-draft-model-path",
                      str(draft_dir), *flags)
    assert (view.speculative_num_draft_tokens, view.speculative_num_steps) == (nodes, depth)


def test_a_stop_threshold_with_a_tree_stops_resolution_with_one_line(loaded, draft_dir, tiny_model, monkeypatch):
    assert_refused(monkeypatch, tiny_model, '{"speculative": {"stop_threshold": 0.5}}',
                   r'^afterburner\.speculative\.stop_threshold: AFTERBURNER_DRAFT cuts chains where the draft\'s '
                   r'confidence falls; set tree to "chain" \(or drop stop_threshold for a token tree\)$',
                   "--speculative-algorithm", "AFTERBURNER_DRAFT", "--speculative-draft-model-path", str(draft_dir))


def test_a_drafting_vocabulary_stops_resolution_with_one_line(loaded, draft_dir, tiny_model, monkeypatch):
    assert_refused(monkeypatch, tiny_model, '{"speculative": {"tree": "chain", "draft_vocab": 64}}',
                   r"^afterburner\.speculative\.draft_vocab: AFTERBURNER_DRAFT drafts from the draft model's whole "
                   r"vocabulary; leave draft_vocab unset$",
                   "--speculative-algorithm", "AFTERBURNER_DRAFT", "--speculative-draft-model-path", str(draft_dir))


def test_no_draft_folder_stops_resolution_with_one_line(loaded, tiny_model, monkeypatch):
    assert_refused(monkeypatch, tiny_model, None,
                   r"^--speculative-algorithm AFTERBURNER_DRAFT needs --speculative-draft-model-path: a draft model "
                   r"folder with the target's vocabulary \(derive one with `afterburner models draft`\)$",
                   "--speculative-algorithm", "AFTERBURNER_DRAFT")
