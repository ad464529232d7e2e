"""The `gradhealth` command line.

`gradhealth report` and `gradhealth demo` (`main`), and the demo's nets and runs (`demo`).
"""
