"""The inference side's observability on the test tier: SAE-hook stage timings and the throughput ring."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from engine.generation import FinishEvent, GenerationRequest
from engine.hook_timing import STAGES
from engine.runtime import EngineRuntime
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerStatus
from engine.steering import SteeringFeature, SteeringSpec
from engine.throughput import ThroughputSampler


def generate(runtime: EngineRuntime, steering=None, *, monitor: bool = False, max_tokens: int = 6) -> int:
    handle = runtime.scheduler.submit(GenerationRequest("The cat", SamplingParams(max_tokens=max_tokens,
                                                                                  temperature=0.0),
                                                        steering=steering, monitor=monitor, request_id="r"))
    return sum(1 for e in handle if not isinstance(e, FinishEvent))


def stage_count(layer: int, stage: str) -> float:
    return REGISTRY.get_sample_value("millm_sae_hook_seconds_count", {"layer": str(layer), "stage": stage}) or 0.0


@pytest.fixture
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    yield runtime
    runtime.unload()


def test_a_steered_monitored_generation_times_every_stage_of_its_layer(runtime, test_tier_assets):
    attached = runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    layer = attached.hook_layer
    before = {stage: stage_count(layer, stage) for stage in STAGES}
    tokens = generate(runtime, runtime.compile(SteeringSpec(features=(SteeringFeature(7, 5.0),))), monitor=True)
    passes = {stage: stage_count(layer, stage) - before[stage] for stage in STAGES}
    # One prefill and one decode step per token after the first: one observation per stage per pass.
    assert tokens == 6 and passes == {"encode": 6, "steering": 6, "capture": 6}
    labels = {"layer": str(layer), "stage": "encode"}
    assert REGISTRY.get_sample_value("millm_sae_hook_seconds_sum", labels) > 0
    assert REGISTRY.get_sample_value("millm_sae_hook_seconds_bucket", {**labels, "le": "+Inf"}) >= 6


def test_an_unsteered_unmonitored_pass_and_a_detached_hook_time_nothing(runtime, test_tier_assets):
    layer = runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path)).hook_layer
    before = {stage: stage_count(layer, stage) for stage in STAGES}
    generate(runtime)  # attached, but nothing steered and nothing monitored: the hook does nothing to time
    assert {stage: stage_count(layer, stage) for stage in STAGES} == before
    runtime.detach_sae()
    generate(runtime, monitor=True)
    assert {stage: stage_count(layer, stage) for stage in STAGES} == before


def status(*, tokens_total: int, active: int = 0, queued: int = 0) -> SchedulerStatus:
    return SchedulerStatus(running=True, queued=queued, active=active, max_batch_size=16, tokens_per_second=0.0,
                           requests_total=1, tokens_total=tokens_total)


def test_the_ring_keeps_busy_intervals_newest_first_and_is_bounded():
    now = [100.0]
    reading = ["tiny", status(tokens_total=0)]
    sampler = ThroughputSampler(lambda: tuple(reading) if reading[0] else None, capacity=3, clock=lambda: now[0])
    assert sampler.sample() is None  # the first look is the baseline
    for i, (tokens, active) in enumerate([(50, 4), (150, 8), (150, 0), (400, 16), (1000, 2)]):
        now[0] += 2.0
        reading[1] = status(tokens_total=tokens, active=active, queued=i)
        sampler.sample()
    samples = sampler.samples()
    # The idle interval (no new token, no row running) left nothing; the ring holds the newest three.
    assert [(s["tokens_per_second"], s["batch_size"], s["queue_depth"]) for s in samples] == [
        (300.0, 2, 4), (125.0, 16, 3), (50.0, 8, 1)]
    assert samples[0]["rss_bytes"] > 0 and samples[0]["model"] == "tiny" and samples[0]["interval_s"] == 2.0
    assert samples[0]["gpu_allocated_bytes"] is None or samples[0]["gpu_allocated_bytes"] >= 0
    assert sampler.samples(limit=1) == samples[:1]
    now[0] += 2.0
    reading[1] = status(tokens_total=30, active=1)  # a reload: the new scheduler counts from zero
    assert sampler.sample().tokens == 30
    reading[0] = None
    assert sampler.sample() is None


def test_the_runtime_samples_while_generating_and_reports_it_in_its_status(runtime):
    runtime.throughput.stop()
    runtime.throughput.interval_s = 0.05
    runtime.throughput.start()
    deadline = time.monotonic() + 30
    while not runtime.status()["throughput_samples"] and time.monotonic() < deadline:
        generate(runtime, max_tokens=20)
    sample = runtime.status()["throughput_samples"][0]
    assert sample["model"] == "tiny" and sample["tokens"] > 0 and sample["tokens_per_second"] > 0
    assert sample["max_batch_size"] == runtime.max_batch_size
