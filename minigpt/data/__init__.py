"""Next-token training data (book ch. 2, 5): sliding windows of token ids and the named corpora."""
