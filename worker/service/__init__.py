"""The Redis worker service: read → intake → engine thread → publish, with recovery and metrics.

One module per stage (README, "Layout"); `worker.py` only wires them and runs the
loops, `run.py` is one worker process. Nothing here is imported by the client
(`producer`) or by the engine.
"""
