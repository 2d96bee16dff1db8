"""Tokenizers: the shared vocabulary, BPE text tokenizer and VQ-GAN image tokenizer."""
