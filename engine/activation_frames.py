"""Per-token activation frames (DESIGN "Monitoring"): what the SAE hook captured, turned into
`{position, type, token, token_id, features: {index: value}}` for the prompt and every generated token.

The hook reports captures per forward pass: the first token's event carries the whole prompt
(prefill), each later event carries the previously generated token's position. A FrameBuilder per
request keeps the positions and token ids straight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.sae_hook import FeatureCapture


class FrameBuilder:
    def __init__(self, prompt_ids: Sequence[int], decode_token: Callable[[int], str]) -> None:
        self.prompt_ids = list(prompt_ids)
        self.decode_token = decode_token
        self.generated_ids: list[int] = []

    def frames(self, token_id: int, captures: Sequence[Any]) -> list[dict[str, Any]]:
        """Frames for the captures of the pass that produced `token_id` (then remember the token)."""
        frames = []
        produced_at = time.time()  # for the token -> WebSocket lag benchmark
        for capture in captures:
            if not isinstance(capture, FeatureCapture):
                continue
            for n, generated in enumerate(capture.generated):
                if generated:
                    position = len(self.prompt_ids) + len(self.generated_ids) - 1
                    input_id = self.generated_ids[-1]
                else:
                    position = n
                    input_id = self.prompt_ids[n]
                features = {str(i): round(v, 4) for i, v in zip(capture.topk_indices[n], capture.topk_values[n],
                                                               strict=True) if v > 0}
                for index, values in capture.monitored.items():
                    features[str(index)] = round(values[n], 4)
                frames.append({"position": position, "type": "generated" if generated else "prompt",
                               "token": self.decode_token(input_id), "token_id": input_id, "features": features,
                               "produced_at": produced_at})
        self.generated_ids.append(token_id)
        return frames
