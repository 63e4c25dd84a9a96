"""Quantization by hand (appendix F): the NF4 code and blockwise absmax, int8 per row, the quantized
linear layers, and their checkpoint entry.
"""
