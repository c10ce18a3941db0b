"""Quantization: calibration, the algorithms (RTN, GPTQ, AWQ), the checkpoint format and quantized linears."""
