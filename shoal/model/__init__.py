"""Model side: Hugging Face configs, weights, tokenizer and the decoder forward pass (torch only)."""
