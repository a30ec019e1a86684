"""Inference speed: prefill/decode tokens/s, dense and with 2:4 semi-structured sparse kernels."""

from llmprune.speed.bench import SpeedOptions, bench_model, bench_speed, format_report
from llmprune.speed.measure import measure_speed

__all__ = ["SpeedOptions", "bench_model", "bench_speed", "format_report", "measure_speed"]
