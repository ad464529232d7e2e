"""Front-ends that map a framework's state onto the core.

The Lightning callback (`lightning`).
"""
