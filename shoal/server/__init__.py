"""HTTP layer: an OpenAI-compatible API over shoal's AsyncEngine (FastAPI + uvicorn).

The engine knows nothing about HTTP; this package knows nothing about KV blocks. `build_app` in app.py
composes the pieces; launch.py starts uvicorn.
"""
