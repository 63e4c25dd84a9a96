"""From logits to text (book ch. 4-5): sampling, generation with the KV cache, ragged batches,
streaming, and compiled decoding.
"""
