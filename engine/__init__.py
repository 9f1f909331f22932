"""The torch side of miLLM: model loading, generation, SAE hooks, steering math.

Nothing under this package imports Django, so it can be tested (and benchmarked) on its own and
run inside the dedicated inference process only.
"""
