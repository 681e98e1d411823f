"""lm-eval integration: offline tasks generated from local text, and helpers to run them."""
