"""Time spent in the SAE hook per hooked layer and stage, as a Prometheus histogram.

    millm_sae_hook_seconds{layer="<hook layer>", stage="encode" | "steering" | "capture"}

One observation per stage per forward pass (a prefill or one decode step of the whole batch), measured
with `time.perf_counter_ns` around the stage: about 0.1 µs for the clock and a few µs for the
observation, against a pass that takes milliseconds. `encode` is the SAE encode of the monitored rows,
`capture` the top-k, monitored-feature gather and running statistics after it, `steering` the batched
steering (observed only when some row is steered). Nothing is timed while no SAE is attached: the hook
is not even registered then.

On CPU, torch ops are synchronous, so wall time is the stage's compute time. On CUDA, kernels are
queued asynchronously: without a synchronize (which would stall the pipeline every step) the figure
is mostly launch time, and the kernels' cost shows up in whichever later stage first waits on them.

Under `manage.py serve` (PROMETHEUS_MULTIPROC_DIR set) the inference process writes these to the shared
folder and the web process's /metrics sums them in; otherwise they stay in this process's default registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import Histogram

STAGES = ("encode", "steering", "capture")
BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the process creating the first value file needs the folder
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

HOOK_STAGE_SECONDS = Histogram("millm_sae_hook_seconds", "Time in the SAE hook per forward pass, by layer and stage.",
                               ("layer", "stage"), buckets=BUCKETS_S)


class StageTimer:
    """The observe functions for one hooked layer, resolved once at attach (not a label lookup per pass)."""

    def __init__(self, layer: int) -> None:
        def observer(stage: str) -> Callable[[int], None]:
            observe = HOOK_STAGE_SECONDS.labels(layer=str(layer), stage=stage).observe
            return lambda elapsed_ns: observe(elapsed_ns * 1e-9)

        self.encode = observer("encode")
        self.steering = observer("steering")
        self.capture = observer("capture")
