"""Traffic and security policies: who may call (keys, JWT), how much (rate limits, caps), in which order
(priority classes), and what is refused or shed. Configured by one YAML file (`--policy`, config.py).

Policies decide before work reaches the engine; what the engine needs (priority, cache salt) travels as
plain request fields. The engine never imports this package (tests/test_layering.py).
"""
