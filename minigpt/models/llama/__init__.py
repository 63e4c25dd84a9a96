"""The Llama family (Llama 3.x, SmolLM2, Qwen3; book ch. 8): config, RoPE, RMSNorm/SwiGLU/GQA, model,
and the Hugging Face Llama layout.
"""
