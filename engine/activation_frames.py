"""Per-token activation frames (DESIGN "Monitoring"): what the SAE hook captured, turned into
`{position, type, token, token_id, features: {index: value}}` for the prompt and every generated token.

The hook reports captures per forward pass: the first token's event carries the whole prompt
(prefill), each later event carries the previously generated token's position. A FrameBuilder per
request and per consumer (the live monitor; the request's own `return_features`) keeps the positions
and token ids straight and cuts the capture to what that consumer asked for: the hook keeps the
largest top-k and the union of the features any row of the batch needs.

Several SAEs attached: every SAE's hook captures the monitored rows, and `MonitorFrames` holds one
FrameBuilder per SAE (in attach order), so each token gets one frame per SAE, each naming its `sae`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from engine.sae_hook import FeatureCapture


def _captures(items: Iterable[Any]) -> Iterable[FeatureCapture]:
    for item in items:
        if isinstance(item, FeatureCapture):
            yield item
        elif isinstance(item, tuple):  # a row read both before and after steering in one pass
            yield from (c for c in item if isinstance(c, FeatureCapture))


class FrameBuilder:
    def __init__(self, prompt_ids: Sequence[int], decode_token: Callable[[int], str], *, top_k: int | None = None,
                 features: Sequence[int] | None = None, steered: bool | None = None,
                 positions: str = "all", stamp: bool = True, sae: str | None = None,
                 reads: str | None = None) -> None:
        """`top_k`/`features` None: all the capture holds; `steered` None: captures of either residual;
        `positions` "prompt"/"generated" keeps only those frames; `stamp` adds `produced_at`; `sae` (set
        while several SAEs are attached) names the SAE the features belong to in each frame; `reads` None takes
        the default SAE's captures, an SAE name that SAE's (a request's `return_features.sae`)."""
        self.prompt_ids = list(prompt_ids)
        self.decode_token = decode_token
        self.generated_ids: list[int] = []
        self.top_k = top_k
        self.features = tuple(features) if features is not None else None
        self.steered = steered
        self.positions = positions
        self.stamp = stamp
        self.sae = sae
        self.reads = reads

    def frames(self, token_id: int, captures: Sequence[Any]) -> list[dict[str, Any]]:
        """Frames for the captures of the pass that produced `token_id` (then remember the token)."""
        frames = []
        produced_at = time.time()  # for the token -> WebSocket lag benchmark
        for capture in _captures(captures):
            if (self.steered is not None and capture.steered != self.steered) or capture.sae != self.reads:
                continue
            for n, generated in enumerate(capture.generated):
                if generated:
                    position = len(self.prompt_ids) + len(self.generated_ids) - 1
                    input_id = self.generated_ids[-1]
                else:
                    position = n
                    input_id = self.prompt_ids[n]
                kind = "generated" if generated else "prompt"
                if self.positions not in ("all", kind):
                    continue
                ranked = zip(capture.topk_indices[n], capture.topk_values[n], strict=True)
                if self.top_k is not None:
                    ranked = list(ranked)[:self.top_k]
                features = {str(i): round(v, 4) for i, v in ranked if v > 0}
                for index, values in capture.monitored.items():
                    if self.features is None or index in self.features:
                        features[str(index)] = round(values[n], 4)
                frame = {"position": position, "type": kind, "token": self.decode_token(input_id),
                         "token_id": input_id, "features": features}
                if self.sae is not None:
                    frame["sae"] = self.sae
                if self.stamp:
                    frame["produced_at"] = produced_at
                frames.append(frame)
        self.generated_ids.append(token_id)
        return frames


class MonitorFrames:
    """The live monitor's frames from every attached SAE: one FrameBuilder each, in attach order, behind
    FrameBuilder's `frames(token_id, captures)`; a token's frames come SAE by SAE, in that order."""

    def __init__(self, builders: Sequence[FrameBuilder]) -> None:
        self.builders = tuple(builders)

    def frames(self, token_id: int, captures: Sequence[Any]) -> list[dict[str, Any]]:
        per_sae = [builder.frames(token_id, captures) for builder in self.builders]
        # Prefill: position by position, each position's frames in attach order.
        return sorted((frame for frames in per_sae for frame in frames), key=lambda frame: frame["position"])
