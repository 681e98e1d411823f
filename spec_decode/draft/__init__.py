"""Draft-based approximate inference (arXiv 2506.08373): drafts derived from a target (``derive.py``) and
SpecPC prompt compression (the rule in ``specpc.py``, the draft runner in ``specpc_draft.py``)."""
