"""The per-step decision.

The guard (`step`) returns a `StepOutcome`; spikes (`spikes`), clipping (`clipping`), the sync-free verdict
(`deferred`) and the NaN's birthplace replay (`birth`).
"""
