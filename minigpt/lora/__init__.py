"""Low-rank adaptation by hand (appendix E): LoRA layers, which layers they adapt, merging, and adapter files."""
