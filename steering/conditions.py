"""Conditions of the active steering and of profiles, checked before anything changes.

A condition reads one feature's activation at the same token, in raw activation units:
`{"sae": <name, optional>, "index": 88, "above": 3.0}` (or `below`, or both: a band above < f < below).
A steered feature's `when` gates it per token; `abort_when` stops the generation where one holds
(engine/steering_conditions.py; docs/steering.md "Conditions"). Conditional steering is additive only.
"""

from __future__ import annotations

import math
import re
from typing import Any

from engine.rules import feature_index_problem
from inference import messages as m
from millm_site.errors import InvalidFeatureIndex, SaeNotAttached, ValidationFailed
from steering.models import SaeStatus, SparseAutoencoder

MAX_ABORT_CONDITIONS = 64


def _bound(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationFailed(f"{field}: must be a finite number", details={"field": field})
    return float(value)


def condition_normalise(condition: Any, *, field: str, default_sae: SparseAutoencoder | None,
                        attached: dict[str, SparseAutoencoder] | None = None) -> dict[str, Any]:
    """One condition checked against the SAE it reads (its `sae`, else the default); normalised.

    `attached` names the SAEs a condition may read (None: only the default one)."""
    shaped = condition_shape(condition, field=field)
    name = shaped.get("sae")
    saes = attached if attached is not None else ({default_sae.name: default_sae} if default_sae else {})
    sae = default_sae if name is None else saes.get(name)
    if sae is None:
        raise SaeNotAttached(f"{field}: the condition reads SAE {name or '(default)'}, which is not attached "
                             f"(attached: {', '.join(saes) or 'none'})", details={"field": f"{field}.sae"})
    if (problem := feature_index_problem(shaped["index"], sae.d_sae)) is not None:
        raise InvalidFeatureIndex(f"{field}.index: {problem} for SAE {sae.name}",
                                  details={"field": f"{field}.index", "d_sae": sae.d_sae})
    return shaped


CONDITION_TEXT = re.compile(
    r"^\s*(?:(?P<low>-?[\d.eE+-]+)\s*<\s*)?(?P<sae>[-\w.]+)?#(?P<index>\d+)\s*"
    r"(?:(?P<op>[<>])\s*(?P<bound>-?[\d.eE+-]+))?\s*$")


def condition_parse(text: str, *, field: str) -> dict[str, Any] | None:
    """`#88 > 3`, `#88 < 1`, `2 < #88 < 5` or `sae-b#88 > 3` (what `condition_text` writes); "" is no condition."""
    if not text.strip():
        return None
    match = CONDITION_TEXT.match(text)
    low, op, bound = (match["low"], match["op"], match["bound"]) if match else (None, None, None)
    if match is None or (low is None and op is None) or (low is not None and op != "<" and op is not None):
        raise ValidationFailed(f"{field}: {text[:40]!r} is not a condition like '#88 > 3', '#88 < 1' or "
                               "'2 < #88 < 5'", details={"field": field})
    try:
        condition: dict[str, Any] = {"index": int(match["index"])}
        if low is not None:
            condition["above"] = float(low)
        if op == ">":
            condition["above"] = float(bound)
        elif op == "<":
            condition["below"] = float(bound)
    except ValueError:
        raise ValidationFailed(f"{field}: {text[:40]!r} has a bound that is not a number",
                               details={"field": field}) from None
    if match["sae"]:
        condition["sae"] = match["sae"]
    return condition


def condition_shape(condition: Any, *, field: str) -> dict[str, Any]:
    """The checks that need no SAE: an object with an integer index and finite, non-empty bounds
    (the Steering page sends a condition as text: parsed here)."""
    if isinstance(condition, str):
        condition = condition_parse(condition, field=field) or {}
    if not isinstance(condition, dict):
        raise ValidationFailed(f"{field}: must be an object {{index, above|below}}", details={"field": field})
    unknown = set(condition) - {"sae", "index", "above", "below"}
    if unknown:
        raise ValidationFailed(f"{field}: unknown field(s) {', '.join(sorted(unknown))}", details={"field": field})
    name = condition.get("sae")
    if name is not None and not isinstance(name, str):
        raise ValidationFailed(f"{field}.sae: must be an SAE name", details={"field": f"{field}.sae"})
    index = condition.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValidationFailed(f"{field}.index: must be a non-negative integer", details={"field": f"{field}.index"})
    above, below = _bound(condition.get("above"), f"{field}.above"), _bound(condition.get("below"), f"{field}.below")
    if above is None and below is None:
        raise ValidationFailed(f"{field}: give `above` or `below` (or both, for a band)", details={"field": field})
    if above is not None and below is not None and above >= below:
        raise ValidationFailed(f"{field}: above ({above:g}) must be less than below ({below:g}): the band is empty",
                               details={"field": field})
    normalised: dict[str, Any] = {"index": index}
    if name is not None:
        normalised["sae"] = name
    if above is not None:
        normalised["above"] = above
    if below is not None:
        normalised["below"] = below
    return normalised


def conditions_normalise(*, features: list[dict[str, Any]], abort_when: list[Any] | None, mode: str,
                         sae: SparseAutoencoder | None, attached: dict[str, SparseAutoencoder] | None = None,
                         shape_only: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The features with their `when` checked (dropped when None) and the abort conditions, normalised.

    `shape_only`: no SAE to check indices against (a profile saved without one; checked when activated)."""

    def check(condition: Any, field: str) -> dict[str, Any]:
        if shape_only:
            return condition_shape(condition, field=field)
        return condition_normalise(condition, field=field, default_sae=sae, attached=attached)

    abort_when = list(abort_when or [])
    if len(abort_when) > MAX_ABORT_CONDITIONS:
        raise ValidationFailed(f"abort_when: at most {MAX_ABORT_CONDITIONS} conditions",
                               details={"field": "abort_when"})
    checked = []
    for position, feature in enumerate(features):
        feature = {k: v for k, v in feature.items() if not (k == "when" and v is None)}
        if "when" in feature:
            if mode != "additive":
                raise ValidationFailed(f"features[{position}].when: conditions apply to additive steering only",
                                       details={"field": f"features[{position}].when"})
            feature["when"] = check(feature["when"], f"features[{position}].when")
        checked.append(feature)
    aborts = [check(c, f"abort_when[{n}]") for n, c in enumerate(abort_when)]
    return checked, aborts


def attached_saes() -> dict[str, SparseAutoencoder]:
    return {s.name: s for s in SparseAutoencoder.objects.filter(status=SaeStatus.ATTACHED)}


def condition_message(condition: dict[str, Any]) -> m.Condition:
    """The contract's condition; `sae` travels only where the contract carries it (several SAEs)."""
    fields = {k: v for k, v in condition.items() if k in m.Condition.model_fields}
    return m.Condition(**fields)


def condition_text(condition: dict[str, Any] | None) -> str:
    """`#88 > 3` / `2 < #88 < 5` / `sae-b#88 < 1`, for the pages."""
    if not condition:
        return ""
    feature = f"{condition['sae']}#{condition['index']}" if condition.get("sae") else f"#{condition['index']}"
    above, below = condition.get("above"), condition.get("below")
    if above is not None and below is not None:
        return f"{above:g} < {feature} < {below:g}"
    return f"{feature} > {above:g}" if above is not None else f"{feature} < {below:g}"
