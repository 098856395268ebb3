"""The engine: one thread that steps every running request (loop.py), each request's state
(sequence.py), its stop strings (stops.py) and logprobs (logprobs.py), and the counters
the engine keeps for /metrics (counters.py)."""

from server.engine.loop import Engine

__all__ = ["Engine"]
