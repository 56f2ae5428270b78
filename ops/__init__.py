"""Device dispatch for the engine's hot ops: the only place that decides CPU (torch) vs CUDA (Triton).

Each op has a plain-torch implementation that is both the CPU path and the
reference the Triton kernels in `kernels/` are tested against.
"""
