"""Structured output at the HTTP face: a request's response_format and tools as a grammar
(verifier/grammar.py), and tool calls read back from the reply."""
