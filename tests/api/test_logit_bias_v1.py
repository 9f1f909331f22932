"""logit_bias through /v1 on the test-tier model: +100 makes a token the greedy choice, a token id
outside the vocabulary is a 400 naming logit_bias."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

pytestmark = pytest.mark.django_db(transaction=True)


def complete(client, model: str, **extra):
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, **extra}
    return client.post("/v1/completions", json.dumps(body), content_type="application/json")


def test_logit_bias_steers_the_greedy_choice(client, tiny_catalog, inference_worker):
    model, _ = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    tokenizer = AutoTokenizer.from_pretrained(model.local_path)
    plain = complete(client, model.name).json()["choices"][0]["text"]
    token_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" Rome"))[0]
    biased = complete(client, model.name, logit_bias={str(token_id): 100}).json()["choices"][0]["text"]
    assert biased != plain and biased == tokenizer.decode([token_id] * 3)
    refused = complete(client, model.name, logit_bias={str(len(tokenizer) + 10_000): 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logit_bias"
