"""The miStudio-compatible profile file (DESIGN.md "Profile file"), validated whole before any write."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from engine.rules import (
    MAX_STEERED_TOKENS,
    MAX_STEERING_LAYERS,
    SteeringDirection,
    SteeringMode,
    SteeringPositions,
)

MAX_STRENGTH = 10000.0  # the database's bound (profiles.models); the engine applies its own at steering time
MAX_FEATURE_INDEX = (1 << 31) - 1  # the index column is a 32-bit integer on PostgreSQL (and SQLite's is 64)


class ConditionFile(BaseModel):
    """A feature's activation at the same token (raw units): holds where above < f < below (steering/conditions.py)."""

    model_config = ConfigDict(extra="forbid")
    sae: str | None = Field(default=None, max_length=120)  # None: the profile's SAE
    index: int = Field(ge=0, le=MAX_FEATURE_INDEX)
    above: float | None = Field(default=None, allow_inf_nan=False)
    below: float | None = Field(default=None, allow_inf_nan=False)


class VectorRefFile(BaseModel):
    """A stored steering vector (/api/vectors) the profile adds, by name."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    strength: float = Field(default=1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)


class ProfileFeatureFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sae: str | None = Field(default=None, max_length=120)  # another SAE of the model (several attached); None: the profile's
    index: int = Field(ge=0, le=MAX_FEATURE_INDEX)
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    label: str = Field(default="", max_length=300)
    when: ConditionFile | None = None  # miLLM's own: steered only on tokens where it holds


class ProfileModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    repo_id: str = Field(min_length=1)
    quantization: str | None = None
    name: str | None = None  # miLLM's catalog name, when exported by miLLM


class ProfileSaeRef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    repo_id: str = Field(min_length=1)
    layer: int = Field(ge=0)
    sae_id: str | None = None
    name: str | None = None


class ProfileFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: Literal["1.0"]
    name: str = Field(min_length=1, max_length=100, pattern=r"^[-a-zA-Z0-9_]+$")
    description: str = ""
    model: ProfileModelRef | None = None
    sae: ProfileSaeRef | None = None
    features: list[ProfileFeatureFile] = Field(default_factory=list, max_length=1024)
    mode: SteeringMode = "additive"
    positions: SteeringPositions = "all"
    # miLLM's own (a miStudio file without them steers the SAE's layer along decoder rows, as before)
    layers: list[int] = Field(default_factory=list, max_length=MAX_STEERING_LAYERS)
    direction: SteeringDirection = "decoder"
    abort_when: list[ConditionFile] = Field(default_factory=list, max_length=64)  # stop where one holds
    vectors: list[VectorRefFile] = Field(default_factory=list, max_length=16)  # stored vectors, by name
    # Steer only the first N generated tokens / until a steered concept token is written (strict: "3" is refused).
    max_steered_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_STEERED_TOKENS)
    until_concept: StrictBool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
