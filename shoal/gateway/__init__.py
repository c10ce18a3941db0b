"""The shoal gateway: an async HTTP proxy in front of several shoal (or any OpenAI-compatible) servers.

Routing by model and version, load- and prefix-aware choice among replicas, blue-green, canary with
automatic rollback and shadow traffic with output comparison. The patterns follow the Kubernetes
Gateway API Inference Extension's endpoint picker, vLLM's production-stack router and the canary
analysis of Argo Rollouts / Kayenta, for those who run shoal without Kubernetes.

The gateway never imports torch, `shoal.engine` or `shoal.model` (tests/test_layering.py checks it): it
runs on a small box in front of the GPU servers.
"""
