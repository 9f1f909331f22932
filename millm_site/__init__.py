"""The miLLM Django project."""
