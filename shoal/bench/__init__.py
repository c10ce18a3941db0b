"""Benchmarks with vLLM's names (`latency`, `throughput`): shoal against Hugging Face transformers' `generate`.

Each benchmark runs both sides in one process on the same weights, dtype and token ids, with EOS ignored on
both, and reports ratios: other work on the machine slows both sides of the same run alike, so the ratio is
the number to quote, the absolute tokens/s only with the machine and load it was measured on.
"""
