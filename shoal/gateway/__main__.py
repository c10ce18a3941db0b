"""`python -m shoal.gateway --config gateway.yaml`: the gateway without the rest of the `shoal` command
line (which imports torch for its benchmarks), for a box in front of the GPU servers."""

from shoal.gateway.cli import gateway_app

gateway_app(prog_name="shoal gateway")
