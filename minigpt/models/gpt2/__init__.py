"""GPT-2 (book ch. 4-5): config, layers, model, and the Hugging Face GPT-2 layout."""
