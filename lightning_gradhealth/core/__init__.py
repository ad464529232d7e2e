"""The pipeline of one optimizer step, shared by every front-end.

`GradientHealth` (`health`), and what a front-end tells it about a step (`context`).
"""
