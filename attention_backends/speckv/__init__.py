"""SpecKV as a selection method: per request, the prompt KV a draft's look-ahead says to keep."""
