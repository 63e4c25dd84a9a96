"""Is the fine-tuned model better, and did it forget? Perplexity, judges, the pairwise win rate,
ROUGE-L, the lm-eval bridge.
"""
