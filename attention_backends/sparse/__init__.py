"""Query-aware KV block selection (Quest-style): per-block key summaries and top-k selection."""
