"""Where results go.

Loggers (`sinks`), alerts (`alerts`), the TensorBoard visuals (`visuals`), figures (`plots`), the report (`report`),
reading a run back (`eventfiles`) and the per-run output pipeline (`pipeline`).
"""
