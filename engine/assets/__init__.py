"""Builders for the demo assets: the tiny test tier and the SmolLM2 demo tier."""
