"""Medusa (Cai et al., 2024): extra decoding heads draft a tree of candidate continuations that the base
model verifies in one pass with tree attention. Engine-free pieces: tree buffers and acceptance rules."""
