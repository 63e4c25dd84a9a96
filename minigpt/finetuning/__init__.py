"""Fine-tuning techniques (book ch. 6-7): classification, instruction tuning, NEFTune, preference data and DPO."""
