"""The vocabulary every layer shares; imports nothing else from the package.

The typed record (`record`), metric keys (`metrics`), kinds (`kinds`), alerts and severities (`alert`), errors
(`errors`).
"""
