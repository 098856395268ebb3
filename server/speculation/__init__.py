"""Speculation: the proposers (the DGF draft, prompt lookup, both merged), the tree they
propose, and the policy over them (the adaptive budget, the per-request choice).
proposer.py declares the interfaces the engine uses."""
