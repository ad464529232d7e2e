"""Judgement over the records.

The bounded history (`history`), per-step checks (`checks`), end-of-run rules (`rules`), fixes (`fixes`) and what a
non-finite step means (`safety`).
"""
