"""HAMburger-style micro-step drafter (Liu et al. 2025, arXiv 2505.20438; repo Jingyu6/hamburger): a small
decoder fed with the base model's hidden states drafts up to a few tokens per base step and a stop head
decides when to end the draft; here a lossless speculative proposer over a frozen base. Engine-free."""
