"""Statistics from gradients and parameters, in plain torch with one host transfer.

The engine (`engine`, `pack`), kernels (`kernels`, `horizontal`, `triton_kernels`), histograms, noise scale
(`noise`), update size (`updates`) and activation statistics (`activations`).
"""
