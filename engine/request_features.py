"""Features returned per request (`return_features` on /v1): what a request asks the SAE hook to capture
for its own row, checked against the attached SAE.

The hook encodes the residual once per pass for every row that needs it (monitoring or a request) and
keeps the largest top-k any of them asks for; each request's frames are then cut to its own k, its own
features and positions by an `activation_frames.FrameBuilder` built from its FeatureRequest.

A position's features are read when its token is the model's *input*: the prompt tokens in the first
pass, each generated token in the pass after it. The last generated token is never an input, so it
has no features.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidFeatureIndexError, InvalidRequestError
from engine.rules import FEATURE_POSITIONS, MAX_RETURN_FEATURES, MAX_RETURN_TOP_K, FeaturePositions


@dataclass(frozen=True)
class FeatureRequest:
    top_k: int = 5  # features per token, by decreasing activation (those > 0)
    positions: FeaturePositions = "all"  # which tokens: "prompt", "generated" or "all"
    features: tuple[int, ...] = ()  # always reported at every token, whatever their rank
    after_steering: bool = False  # read the steered residual instead of what the model itself computed
    sae: str | None = None  # another attached SAE's features (its own hook captures them); None: the default SAE

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))


def validate_feature_request(request: FeatureRequest, *, d_sae: int) -> None:
    """Raise InvalidRequestError / InvalidFeatureIndexError unless the request fits this SAE."""
    top_k = request.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_RETURN_TOP_K:
        raise InvalidRequestError(param="return_features.top_k",
                                  message=f"return_features.top_k must be an integer in [0, {MAX_RETURN_TOP_K}]")
    if request.positions not in FEATURE_POSITIONS:
        raise InvalidRequestError(param="return_features.positions",
                                  message=f"return_features.positions must be one of {', '.join(FEATURE_POSITIONS)}")
    if len(request.features) > MAX_RETURN_FEATURES:
        raise InvalidRequestError(param="return_features.features",
                                  message=f"return_features.features lists at most {MAX_RETURN_FEATURES} features")
    for index in request.features:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < d_sae:
            raise InvalidFeatureIndexError(f"return_features.features: {index!r} is outside [0, {d_sae})",
                                           param="return_features.features")
    if not request.features and request.top_k == 0:
        raise InvalidRequestError(param="return_features",
                                  message="return_features asks for nothing: give top_k > 0 or features")
