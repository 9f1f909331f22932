"""Shared fixtures: the test-tier demo assets (built once per session) and catalog rows for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ASSET_CACHE = Path(os.environ.get("MILLM_ASSET_CACHE", Path(__file__).resolve().parent.parent / "var" / "assets"))


@pytest.fixture(scope="session")
def test_tier_assets():
    from engine.assets.tiny import build_test_tier

    return build_test_tier(ASSET_CACHE / "test")


@pytest.fixture
def tiny_catalog(db, test_tier_assets):
    """The test tier registered in the catalog: (LanguageModel, SparseAutoencoder)."""
    from catalog.demo import demo_assets_register

    return demo_assets_register(assets=test_tier_assets, tier="test")
