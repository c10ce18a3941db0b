"""Model fleet: sources and caching of model files (storage.py)."""
