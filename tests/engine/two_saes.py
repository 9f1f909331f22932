"""The test tier's model with both of its SAEs attached, as the several-SAE engine tests use it."""

from __future__ import annotations

from collections.abc import Iterator

from engine.runtime import EngineRuntime

LATE, EARLY = "late", "early"  # the test tier's layer-2 SAE (attached first: the default) and its layer-1 SAE


def two_sae_runtime(assets) -> Iterator[EngineRuntime]:
    """A runtime serving the test tier with LATE then EARLY attached, monitoring off; unloaded afterwards."""
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(assets.model.local_path))
    runtime.attach_sae(name=LATE, path=str(assets.sae.local_path))
    runtime.attach_sae(name=EARLY, path=str(assets.extra_saes[0].local_path))
    runtime.configure_monitoring(enabled=False)
    yield runtime
    runtime.unload()
