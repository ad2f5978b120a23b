"""Structured outputs: grammar-constrained decoding (JSON schema / JSON object / tool calls) for the engine."""
