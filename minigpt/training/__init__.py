"""The one training loop (book ch. 5, appendix D): losses, AdamW and the schedule, history, exact-
resume checkpoints, Ctrl-C, torchrun, plots.
"""
