"""Steering for the first N generated tokens only (SteeringSpec.max_steered_tokens) and until the concept is written
(SteeringSpec.until_concept), on the test tier, against the model's own greedy forward with a hand-made hook.

By hand: the pass that produces generated token t reads the prompt (t = 1) or token t-1 at position P + t - 2, so
steering the first n tokens means adding the delta at positions < P + n - 1 (the earlier positions stay steered in
the cache), and nothing from position P + n - 1 on."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import InvalidSteeringError
from engine.generation import TokenEvent
from engine.runtime import EngineRuntime
from engine.sae import decoder_layers
from engine.steering import LOGIT_LENS_STOP_TOKENS, SteeringFeature, SteeringSpec

CAT, STRENGTH, TOKENS = 7, 40.0, 10  # the ' cat' feature (engine/assets/tiny.py), strong enough to change the text
PROMPT = "The cat sat on the mat and the dog"
MARKED = "marked"  # a copy of the test-tier SAE whose concept tokens the test chooses


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name="late", path=str(test_tier_assets.sae.local_path))
    runtime.configure_monitoring(enabled=False)
    yield runtime
    runtime.unload()


def engine_ids(runtime, spec, name="r", max_tokens=TOKENS):
    events = runtime.submit(request_id=name, model=None, prompt=PROMPT, messages=None,
                            params={"max_tokens": max_tokens, "temperature": 0.0}, steering=spec).handle
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def hand_ids(runtime, steered, positions="all", tokens=TOKENS):
    """Greedy decoding by the model's own forward over the whole sequence (no cache), the delta added at the hooked
    layer to the positions `steered(P)` selects (P = prompt length) and, for "generated_only", generated ones only."""
    model, sae = runtime.loaded.model, runtime.attached["late"].sae
    delta = STRENGTH * sae.W_dec[CAT]
    prompt = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    start = len(prompt) if positions == "generated_only" else 0

    def work():
        ids = list(prompt)
        layer = decoder_layers(model)[sae.hook_layer]

        def hook(_module, _args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, start:steered(len(prompt))] += delta
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                for _ in range(tokens):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        finally:
            handle.remove()
        return ids[len(prompt):]

    return runtime.scheduler.call(work).result()


def spec(**options) -> SteeringSpec:
    return SteeringSpec(features=(SteeringFeature(CAT, STRENGTH, sae=options.pop("sae", None)),), **options)


@pytest.mark.parametrize("positions", ["all", "generated_only"])
def test_the_first_k_tokens_are_the_steered_runs_and_the_rest_continue_unsteered(runtime, positions):
    k = 3
    full = engine_ids(runtime, spec(positions=positions))
    plain = engine_ids(runtime, None)
    capped = engine_ids(runtime, spec(positions=positions, max_steered_tokens=k))
    assert hand_ids(runtime, lambda p: None, positions) == full  # the hand hook is the engine's steering
    assert capped == hand_ids(runtime, lambda p: p + k - 1, positions)
    assert capped[:k] == full[:k] and capped != full  # the cap changed what follows
    assert full[:k] != plain[:k]  # and the steered part was steered


@pytest.fixture(scope="module")
def marked(runtime, test_tier_assets, tmp_path_factory):
    """Attach a copy of the SAE whose feature CAT has, as its one concept token, the first token of the steered
    answer that is new at its position j >= 1 and whose unsteered continuation differs: returns j."""
    full = engine_ids(runtime, spec())
    j = next(j for j in range(1, TOKENS - 1) if full[j] not in full[:j]
             and hand_ids(runtime, lambda p, j=j: p + j) != full)
    folder = tmp_path_factory.mktemp("sae") / "marked"
    shutil.copytree(test_tier_assets.sae.local_path, folder)
    weights = runtime.attached["late"].sae
    tokens = torch.full((weights.d_sae, 3), -1, dtype=torch.long)
    tokens[CAT, 0] = full[j]
    directions = torch.nn.functional.normalize(weights.W_dec.detach().float().cpu(), dim=-1)
    save_file({"concept_directions": directions.contiguous(), "token_ids": tokens},
              folder / "concept_directions.safetensors")
    runtime.attach_sae(name=MARKED, path=str(folder))
    yield j
    runtime.detach_sae(MARKED)


def test_until_concept_stops_right_after_the_first_concept_token(runtime, marked):
    j = marked
    full = engine_ids(runtime, spec())
    assert runtime.compile(spec(sae=MARKED, until_concept=True)).stop_token_ids == {full[j]}
    until = engine_ids(runtime, spec(sae=MARKED, until_concept=True))
    # Tokens 1..j+1 are the steered run's (the last is the concept token), from there on unsteered.
    assert until == hand_ids(runtime, lambda p: p + j) == engine_ids(runtime, spec(max_steered_tokens=j + 1))
    assert until[:j + 1] == full[:j + 1] and until != full
    # The cap and the latch together: whichever comes first ends the steering (here the cap, one token earlier).
    assert engine_ids(runtime, spec(sae=MARKED, until_concept=True, max_steered_tokens=j)) == hand_ids(
        runtime, lambda p: p + j - 1)


def test_without_concept_tokens_the_stop_tokens_are_the_top_logit_lens_tokens(runtime):
    sae = runtime.attached["late"].sae
    unembedding = runtime.loaded.model.get_output_embeddings().weight.detach().float()
    expected = (sae.W_dec[CAT].float() @ unembedding.T).topk(LOGIT_LENS_STOP_TOKENS).indices.tolist()
    assert runtime.compile(spec(until_concept=True)).stop_token_ids == set(expected)
    assert runtime.compile(spec()).stop_token_ids == frozenset()  # only when asked for


def test_a_batch_mixing_rows_with_and_without_the_options_gives_each_row_its_alone_text(runtime, marked):
    specs = {"capped": spec(max_steered_tokens=5), "until": spec(sae=MARKED, until_concept=True),
             "capped-late": spec(max_steered_tokens=6, positions="generated_only"), "full": spec(), "none": None}
    alone = {name: engine_ids(runtime, s, f"{name}-alone") for name, s in specs.items()}
    together = [(name, runtime.submit(request_id=f"{name}-batch", model=None, prompt=PROMPT, messages=None,
                                      params={"max_tokens": TOKENS, "temperature": 0.0}, steering=s))
                for name, s in specs.items()]
    assert {name: [e.token_id for e in s.handle if isinstance(e, TokenEvent)] for name, s in together} == alone
    assert len({tuple(v) for v in alone.values()}) == len(alone)  # each option does change the text


@pytest.mark.parametrize("options, message", [
    ({"max_steered_tokens": 0}, "max_steered_tokens must be an integer in"),
    ({"max_steered_tokens": -3}, "max_steered_tokens must be an integer in"),
    ({"max_steered_tokens": 10**9}, "max_steered_tokens must be an integer in"),
    ({"max_steered_tokens": 2.5}, "max_steered_tokens must be an integer in"),
    ({"max_steered_tokens": True}, "max_steered_tokens must be an integer in"),
    ({"until_concept": "yes"}, "until_concept must be true or false"),
])
def test_bad_options_are_refused(runtime, options, message):
    with pytest.raises(InvalidSteeringError, match=message):
        runtime.compile(spec(**options))


def test_until_concept_without_features_is_refused(runtime):
    with pytest.raises(InvalidSteeringError, match="until_concept needs SAE features"):
        runtime.compile(SteeringSpec(features=(), until_concept=True))


def test_a_calibration_recipe_records_the_options_only_when_set():
    from engine.calibration_file import CalibrationRecipe

    plain = CalibrationRecipe(direction="concept", layers=(8, 11), positions="generated_only")
    assert plain.as_dict() == {"mode": "additive", "direction": "concept", "positions": "generated_only",
                               "layers": [8, 11]}  # as calibration.json files written before the options
    stopped = CalibrationRecipe(direction="concept", max_steered_tokens=15, until_concept=True)
    assert stopped.as_dict()["max_steered_tokens"] == 15 and stopped.as_dict()["until_concept"] is True
