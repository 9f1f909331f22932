"""The logit lens and corpus activations of the test tier's word features, on the engine alone."""

from __future__ import annotations

import pytest
import torch

from engine.assets.tiny import FEATURE_INDICES
from engine.assets.tiny_tokenizer import FEATURE_WORDS
from engine.feature_lens import corpus_activations, feature_logits, unembedding_with_gain
from engine.loading import load_model
from engine.sae import load_sae


@pytest.fixture(scope="module")
def tiny(test_tier_assets):
    torch.set_num_threads(1)
    loaded = load_model(test_tier_assets.model.local_path)
    return loaded, load_sae(test_tier_assets.sae.local_path, dtype=torch.float32)


def test_a_word_feature_promotes_its_word_first(tiny):
    loaded, sae = tiny
    unembedding = unembedding_with_gain(loaded.model)
    for index, word in zip(FEATURE_INDICES, FEATURE_WORDS, strict=True):
        promoted, suppressed = feature_logits(sae.W_dec[index], unembedding, loaded.tokenizer, count=5)
        assert promoted[0].text == f" {word}", (index, promoted)
        assert promoted[0].logit > promoted[1].logit > suppressed[0].logit
        assert suppressed[0].logit == min(t.logit for t in suppressed) and f" {word}" not in {t.text for t in suppressed}


def test_corpus_activations_keep_the_word_features_firing_on_their_word(tiny):
    loaded, sae = tiny
    texts = ["In the morning the cat was quiet.", "The river was long and the moon was high."]
    acts = corpus_activations(loaded.model, loaded.tokenizer, sae, texts, max_tokens=1000)
    assert acts.doc_start[0] == 0 and acts.doc_start[-1] == len(acts.token_text) and len(acts.doc_start) == 3
    assert (acts.values > 0).all() and len(acts.rows) == len(acts.features)
    for index, word in zip(FEATURE_INDICES, FEATURE_WORDS, strict=True):
        fired = {acts.token_text[r] for r in acts.rows[acts.features == index]}
        assert fired == ({f" {word}"} if word in ("cat", "river", "moon") else set()), (word, fired)
    capped = corpus_activations(loaded.model, loaded.tokenizer, sae, texts, max_tokens=5)
    assert len(capped.token_text) == 5 and capped.rows.max(initial=0) < 5


def test_batched_texts_give_the_activations_of_one_text_at_a_time_and_repeats_are_skipped(tiny):
    loaded, sae = tiny
    texts = ["The cat.", "In the morning the river was long and the moon was high over the old road.",
             "The cat.", "A dog and a cat and a moon.", "The river"]
    alone = corpus_activations(loaded.model, loaded.tokenizer, sae, texts, max_tokens=1000, batch_tokens=1)
    batched = corpus_activations(loaded.model, loaded.tokenizer, sae, texts, max_tokens=1000)
    assert len(batched.doc_start) == 5  # four distinct texts: the repeated "The cat." is read once
    assert batched.token_text == alone.token_text and (batched.doc_start == alone.doc_start).all()
    assert (batched.rows == alone.rows).all() and (batched.features == alone.features).all()
    assert torch.allclose(torch.from_numpy(batched.values), torch.from_numpy(alone.values), atol=1e-4)
    assert (batched.rows[1:] >= batched.rows[:-1]).all()  # in corpus order
