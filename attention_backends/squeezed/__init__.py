"""Squeezed Attention (Hooper et al. 2024): cluster a shared fixed context's keys offline, read only the
clusters a query is estimated to need.

kmeans.py (clustering by direction) -> index.py (SqueezedIndex, builders) -> lookup.py (estimates and
selection) -> calibrate.py (the global threshold) -> reference.py (the attention it computes);
store.py keeps built indexes within a byte bound.
"""
