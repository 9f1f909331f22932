"""POST /api/steering/sweep and the compare's token diff (issue 11), with a real inference process (in a
thread) serving the test tier; bad input is refused before anything starts."""

from __future__ import annotations

import asyncio
import json

import pytest
from django.conf import settings

from millm_site.channel_layer import OneTripRedisChannelLayer
from monitoring.models import RequestRecord
from steering.models import SweepRun, SweepStatus
from steering.sweep_services import degenerate, sweep_recommend
from steering.tasks import sweep_run

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # the test tier's ' cat' feature: its top logit-lens token is ' cat'
PROMPTS = ["Hello!", "Tell me about your weekend."]


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


def error_of(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_the_recommended_point_is_the_most_conceptual_strength_that_stays_fluent():
    def point(strength, concept, fluency):
        return {"strength": strength, "concept_score": concept, "fluency": fluency}

    # Baseline fluency -2.0, margin 1.0: strengths whose fluency is below -3.0 do not count.
    points = [point(0, 0.0, -2.0), point(0.5, 1.0, -2.2), point(1.0, 3.0, -2.9), point(2.0, 9.0, -3.5)]
    assert sweep_recommend(points, margin=1.0) == 1.0
    assert sweep_recommend(points, margin=2.0) == 2.0
    assert sweep_recommend([point(0, 0.0, -2.0), point(4.0, 9.0, -8.0)], margin=1.0) is None
    assert sweep_recommend([point(1.0, 2.0, -1.0)]) is None  # no baseline to compare with
    # Degenerate answers never count, however predictable the repetition makes them.
    assert sweep_recommend([point(0, 0.0, -0.9), point(0.05, 0.6, -1.1),
                            {**point(0.4, 8.6, -1.6), "degenerate": 1 / 3}]) == 0.05
    # A strength that keeps the fluency but does not raise the concept score is no recommendation.
    assert sweep_recommend([point(0, 0.5, -2.0), point(0.25, 0.5, -2.0), point(4.0, 9.0, -8.0)]) is None


def test_degenerate_outputs_by_the_design_rule():
    assert degenerate([1] * 9 + [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])  # one token 9 times in a row
    assert degenerate([1, 2] * 10)  # distinct ratio 0.1
    assert not degenerate([1, 2, 3, 4, 5, 1, 2, 3])  # ratio 0.625, no long run
    assert not degenerate([])


def test_bad_sweeps_are_refused_and_start_nothing(client, tiny_catalog):
    model, sae = tiny_catalog
    # No SAE attached (nothing is loaded either): refused before any inference call.
    assert error_of(post(client, "/api/steering/sweep", {"features": [{"index": CAT}]})) == (400, "SAE_NOT_ATTACHED")
    assert error_of(post(client, "/api/steering/sweep", {"features": []})) == (422, "VALIDATION_ERROR")
    sae.status, sae.desired_attached = "attached", True
    sae.save()
    cases = [
        ({"features": []}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": sae.d_sae}]}, (400, "INVALID_FEATURE_INDEX")),
        ({"features": [{"index": -1}]}, (400, "INVALID_FEATURE_INDEX")),
        ({"features": [{"index": CAT}], "strengths": [float(s) for s in range(1, 16)], "prompts": PROMPTS * 3},
         (422, "VALIDATION_ERROR")),  # 16 × 6 = 96 generations > 64
        ({"features": [{"index": CAT}], "strengths": list(range(1, 30))}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}], "strengths": []}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}], "strengths": "most"}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}], "prompts": [""]}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}], "max_tokens": 100000}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT, "strength": 900.0}], "strengths": [2.0]}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}, {"index": CAT}]}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}], "units": "furlongs"}, (422, "VALIDATION_ERROR")),
        ({"features": [{"index": CAT}], "abort_when": [{"index": 1, "above": 1.0}]}, (422, "VALIDATION_ERROR")),
    ]
    for body, expected in cases:
        response = post(client, "/api/steering/sweep", body)
        assert error_of(response) == expected, (body, response.content)
        assert b"Traceback" not in response.content and b"/work/" not in response.content
    assert SweepRun.objects.count() == 0 and RequestRecord.objects.count() == 0
    assert error_of(client.get("/api/steering/sweeps/nope")) == (404, "NOT_FOUND")
    assert client.get("/api/steering/sweeps/00000000-0000-0000-0000-000000000000").status_code == 404


@pytest.fixture
def serving(client, tiny_catalog, inference_worker):
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


def test_compare_returns_a_token_diff_and_runs_again_the_same(client, serving):
    body = {"prompt": "Hello!", "features": [{"index": CAT, "strength": 2.0}], "units": "residual_norm",
            "max_tokens": 12}
    first = post(client, "/api/steering/compare", body)
    assert first.status_code == 200, first.content
    data = first.json()["data"]
    diff = data["token_diff"]
    assert data["steered"]["text"] != data["unsteered"]["text"] and "cat" in data["steered"]["text"]
    assert len(diff["tokens"]) == data["steered"]["completion_tokens"]
    assert "".join(t["token"] for t in diff["tokens"]) == data["steered"]["text"]
    assert [t["position"] for t in diff["tokens"]] == list(range(len(diff["tokens"])))
    for token in diff["tokens"]:
        assert token["kl"] >= 0 and token["steered_logprob"] <= 0 and token["unsteered_logprob"] <= 0
    divergence = diff["first_divergence"]
    assert divergence is not None
    assert all(t["kl"] >= 0 for t in diff["tokens"][:divergence])
    # The text diverges where the steered model's choice was unlikely for the unsteered one.
    assert diff["tokens"][divergence]["steered_logprob"] > diff["tokens"][divergence]["unsteered_logprob"]
    changed = diff["top_changed_features"]
    assert changed and CAT in [f["index"] for f in changed]
    cat = next(f for f in changed if f["index"] == CAT)
    assert cat["label"] and cat["after"] > cat["before"] and cat["delta"] == pytest.approx(cat["after"] - cat["before"])
    again = post(client, "/api/steering/compare", body)
    assert again.status_code == 200 and again.json()["data"]["token_diff"] == diff


def test_an_inline_sweep_scores_each_strength_and_recommends_one(client, serving):
    model, sae = serving
    response = post(client, "/api/steering/sweep", {"features": [{"index": CAT}], "strengths": [0.5, 2.0],
                                                     "units": "residual_norm", "prompts": PROMPTS, "max_tokens": 12})
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["status"] == "done" and data["progress"] == 1.0
    result = data["result"]
    assert result["strengths"] == [0.0, 0.5, 2.0] and "cat" in result["top_tokens"]
    points = {p["strength"]: p for p in result["points"]}
    assert [len(p["outputs"]) for p in points.values()] == [2, 2, 2]
    assert points[2.0]["concept_score"] > points[0.0]["concept_score"]
    assert points[2.0]["token_hits"] == 1.0 and points[0.0]["token_hits"] == 0.0  # ' cat' written when steered
    for point in points.values():
        fluency = [o["mean_logprob"] for o in point["outputs"]]
        assert point["fluency"] == pytest.approx(sum(fluency) / len(fluency))
    assert result["recommended_strength"] == sweep_recommend(result["points"], margin=result["fluency_margin"])
    assert result["features"][0]["label"]
    # Same outputs as /v1 greedy: the strength-0 outputs are the unsteered answers.
    for output in points[0.0]["outputs"]:
        reply = post(client, "/v1/chat/completions", {"model": model.name, "max_tokens": 12, "temperature": 0,
                                                        "messages": [{"role": "user", "content": output["prompt"]}]})
        assert reply.json()["choices"][0]["message"]["content"] == output["text"]
    saved = client.get(f"/api/steering/sweeps/{data['id']}").json()["data"]
    assert saved["status"] == "done" and saved["result"] == result


def progress_events_while(work) -> list[dict]:
    """The `sweep_progress` events the /ws/progress/ group received while `work` ran."""
    layer = OneTripRedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])

    async def main() -> list[dict]:
        channel = await layer.new_channel()
        await layer.group_add("progress", channel)
        await asyncio.to_thread(work)
        events = []
        while True:
            try:
                events.append(await asyncio.wait_for(layer.receive(channel), 1.0))
            except TimeoutError:
                return [e for e in events if e.get("kind") == "sweep_progress"]

    return asyncio.run(main())


def test_a_large_sweep_is_queued_as_a_job_and_its_result_saved(client, serving):
    response = post(client, "/api/steering/sweep", {"features": [{"index": CAT}], "strengths": "auto",
                                                     "units": "residual_norm", "prompts": PROMPTS * 2, "max_tokens": 4})
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["status"] == "queued" and data["result"] is None  # 6 strengths × 4 prompts > 16: a job
    events = progress_events_while(lambda: sweep_run(data["id"]))  # the Celery task's body, run here
    progress = [e["payload"]["progress"] for e in events if e["payload"]["id"] == data["id"]]
    assert progress == sorted(progress) and len(progress) >= 24 and progress[-1] == 1.0  # one per generation, then done
    assert events[-1]["payload"]["status"] == "done"
    saved = client.get(f"/api/steering/sweeps/{data['id']}").json()["data"]
    assert saved["status"] == SweepStatus.DONE and saved["progress"] == 1.0
    assert saved["result"]["strengths"] == [0.0, 0.125, 0.25, 0.5, 1.0, 2.0]  # 0.5 × (¼, ½, 1, 2, 4)
    assert len(saved["result"]["points"]) == 6
