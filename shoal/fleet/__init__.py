"""Model fleet: several models in one server (`shoal serve --models models.yaml`: the registry, the memory
budget, the manager that loads and unloads them, fallbacks, and the app that routes by the request's
`model`), and where model files come from (storage.py: shared storage into a checksummed local cache)."""
