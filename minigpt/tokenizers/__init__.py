"""Text to ids and back (book ch. 2, 8): simple word tokenizers, byte-level BPE from scratch, GPT-2's
encoding, a Hugging Face tokenizer.json read by our BPE, and chat templates.
"""
