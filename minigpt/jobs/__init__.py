"""The jobs: what ``minigpt <command>`` runs, each a dataclass of settings plus one function.

* :mod:`minigpt.jobs.pretrain`: ``PretrainConfig`` + ``pretrain`` (a fresh model learns a corpus);
* :mod:`minigpt.jobs.evaluate`: ``EvalConfig`` + ``evaluate`` (loss and perplexity on a corpus);
* :mod:`minigpt.jobs.generate`: ``GenerateConfig`` + ``generate_text`` (continue a prompt);
* :mod:`minigpt.jobs.info`: ``preset_sizes`` (parameters and memory of every preset);
* :mod:`minigpt.jobs.finetune`: ``FinetuneConfig``, the settings the fine-tuning jobs share,
  with their one setup and one finish;
* :mod:`minigpt.jobs.classify`: ``ClassifyConfig`` + ``finetune_classifier`` (book ch. 6);
* :mod:`minigpt.jobs.instruct`: ``InstructConfig`` + ``finetune_instructions`` (book ch. 7);
* :mod:`minigpt.jobs.dpo`: ``DPOConfig`` + ``finetune_dpo`` (preference tuning with DPO);
* :mod:`minigpt.jobs.grpo`: ``GRPOConfig`` + ``finetune_grpo`` (GRPO on a task with checked answers).

Every default is written once, in its dataclass; the command line reads them from there.
A job reports through :mod:`logging` and returns its results; it never prints.

Nothing is imported here, so that ``minigpt generate`` does not load the training code.
"""
