"""On the demo tier (SmolLM2-135M + its SAE), turning up a concept feature at its recommended steering
makes the model write its concept, and clearing the steering gives back the unsteered text exactly.

Runs the engine's own path: scheduler, SAE hook and layer-spread hook, greedy decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.assets import steering_quality as quality
from engine.calibration_file import read_calibration
from engine.chat import build_chat_prompt
from engine.generation import FinishEvent, GenerationRequest
from engine.loading import load_model
from engine.sae import load_sae
from engine.sae_hook import SaeHook
from engine.sampling import SamplingParams
from engine.scheduler import GenerationScheduler
from engine.steering import SteeringFeature, SteeringSpec, compile_steering
from engine.steering_layers import NORM_PROBE_TEXT, LayerSteeringHook, residual_norms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ASSET_CACHE = Path(os.environ.get("MILLM_ASSET_CACHE", Path(__file__).resolve().parents[2] / "var" / "assets"))
PROMPT = "Tell me about your weekend."


@pytest.fixture(scope="module")
def engine():
    from safetensors.torch import load_file

    from engine.assets.smollm2 import build_demo_tier, read_manifest

    torch.set_num_threads(int(os.environ.get("MILLM_TORCH_THREADS", "2")))
    assets = build_demo_tier(ASSET_CACHE / "demo", progress=False)
    loaded = load_model(str(assets.model.local_path))
    hook, layer_hook = SaeHook(), LayerSteeringHook()
    scheduler = GenerationScheduler(loaded, max_batch_size=4, interceptors=[hook, layer_hook]).start()
    sae = scheduler.call(lambda: hook.attach(loaded.model, load_sae(assets.sae.local_path))).result()
    scheduler.call(lambda: layer_hook.attach(loaded.model)).result()
    probe = loaded.tokenizer(NORM_PROBE_TEXT)["input_ids"]
    norms = scheduler.call(lambda: residual_norms(loaded.model, probe)).result()
    concept_file = load_file(Path(assets.sae.local_path) / "concept_directions.safetensors")
    concept, concept_tokens = concept_file["concept_directions"], concept_file["token_ids"]
    recipe = json.loads((Path(assets.sae.local_path) / "steering.json").read_text())
    yield {"assets": assets, "loaded": loaded, "scheduler": scheduler, "sae": sae, "norms": norms,
           "concept": concept, "concept_tokens": concept_tokens, "recipe": recipe, "calibration": read_calibration(Path(assets.sae.local_path)),
           "residual_norm": read_manifest(ASSET_CACHE / "demo")["residual_median_norm"]}
    scheduler.stop()


def answer(engine, steering=None) -> str:
    tokenizer = engine["loaded"].tokenizer
    ids = build_chat_prompt(tokenizer, [{"role": "user", "content": PROMPT}]).token_ids
    handle = engine["scheduler"].submit(GenerationRequest(list(ids), SamplingParams(max_tokens=40, temperature=0.0),
                                                          steering=steering))
    out = []
    for event in handle:
        if isinstance(event, FinishEvent):
            assert event.finish_reason in ("stop", "length"), event
            break
        out.append(event.token_id)
    return tokenizer.decode(out, skip_special_tokens=True)


def strongest_concept_feature(engine, unsteered: str) -> tuple[int, list[str]]:
    """The most coherent concept feature (its label's words name one thing) absent from the plain answer."""
    loaded = engine["loaded"]
    table = loaded.model.get_input_embeddings().weight.detach()

    def coherence(words: list[str]) -> float:
        ids = [loaded.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
        vectors = torch.nn.functional.normalize(table[ids], dim=-1)
        return float(((vectors @ vectors.T).sum() - len(ids)) / (len(ids) * (len(ids) - 1)))

    labels = ((fl.index, fl.label) for fl in engine["assets"].sae.labels)
    return quality.concept_features(labels, count=1, exclude_words=[unsteered], coherence=coherence)[0]


def strongest_calibrated_feature(engine, unsteered: str) -> tuple[int, list[str]]:
    """The concept feature the build's calibration sweep found strongest: every calibration answer mentioned its
    concept at its recommended strength, all fluent (most coherent first), absent from the plain answer."""
    calibration = engine["calibration"]
    labels = dict((fl.index, fl.label) for fl in engine["assets"].sae.labels)
    strongest = []
    for key, points in calibration["method"]["sweep"]["points"].items():
        index = int(key)
        chosen = calibration["recommended"][index] / engine["residual_norm"]
        best = [p for p in points if abs(p[0] - chosen) < 1e-3]
        if best and best[0][1] == best[0][3] == best[0][2]:  # hits == answers == fluent
            strongest.append((index, labels[index]))
    assert strongest, "the calibration sweep found no feature that writes its concept on every calibration prompt"
    table = engine["loaded"].model.get_input_embeddings().weight.detach()

    def coherence(words: list[str]) -> float:
        ids = [engine["loaded"].tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
        vectors = torch.nn.functional.normalize(table[ids], dim=-1)
        return float(((vectors @ vectors.T).sum() - len(ids)) / (len(ids) * (len(ids) - 1)))

    return quality.concept_features(strongest, count=1, exclude_words=[unsteered], coherence=coherence)[0]


def test_recommended_steering_writes_the_concept_and_clearing_restores_the_text(engine):
    """At the feature's own recommended strength (the build's calibration.json), with the SAE's recommended
    steering (steering.json): the concept word appears in the greedy answer to a prompt that does not name it."""
    unsteered = answer(engine)
    index, words = strongest_calibrated_feature(engine, unsteered)
    recipe = engine["recipe"]
    spec = SteeringSpec(
        features=(SteeringFeature(index, engine["calibration"]["recommended"][index]),),  # raw
        mode=recipe["mode"], positions=recipe["positions"], layers=tuple(recipe["layers"]),
        direction=recipe["direction"], max_steered_tokens=recipe.get("max_steered_tokens"),
        until_concept=recipe.get("until_concept", False))  # the preset stops once the concept is written
    compiled = compile_steering(engine["sae"], spec, layer_norms=engine["norms"],
                                concept_directions=engine["concept"], concept_tokens=engine["concept_tokens"])
    steered = answer(engine, compiled)
    assert not quality.mentions(unsteered, words)
    assert quality.mentions(steered, words), (index, words, steered)
    assert quality.is_fluent(engine["loaded"].tokenizer(steered, add_special_tokens=False)["input_ids"]), steered
    assert answer(engine) == unsteered  # steering cleared: the very same text


def test_the_decoder_row_alone_does_not_write_the_concept(engine):
    """Why the recommended steering uses the concept direction: the same feature's decoder row at the
    SAE's layer, at the strength the demo used before (0.35 x residual norm), does not write it."""
    unsteered = answer(engine)
    index, words = strongest_concept_feature(engine, unsteered)
    spec = SteeringSpec(features=(SteeringFeature(index, 0.35 * engine["residual_norm"]),))
    steered = answer(engine, compile_steering(engine["sae"], spec))
    assert steered != unsteered
    assert not quality.mentions(steered, words), steered
