"""A feature addressed as (SAE, index) while several SAEs are attached: which SAE a feature's `sae` names,
checked against the attached ones, and strengths converted with each feature's own SAE.

The default SAE (a feature without `sae`) is the first attached: the lowest `attached_order`
(steering/sae_services.py `sae_set_status`), so today's single-SAE requests keep working unchanged.
"""

from __future__ import annotations

from typing import Any

from django.db.models import F

from millm_site.errors import SaeNotAttached, ValidationFailed
from steering.calibration_services import features_fill_recommended
from steering.models import SaeStatus, SparseAutoencoder
from steering.units import strengths_to_raw

# The attach order (the default SAE first), as the inference process holds them; then by name.
ATTACH_ORDER = (F("attached_order").asc(nulls_last=True), "name")


def attached_saes_in_order() -> dict[str, SparseAutoencoder]:
    """The attached SAEs, the default first (then in attach order)."""
    rows = (SparseAutoencoder.objects.select_related("model").filter(status=SaeStatus.ATTACHED)
            .order_by(*ATTACH_ORDER))
    return {sae.name: sae for sae in rows}


def feature_sae(feature: dict[str, Any], *, field: str, default: SparseAutoencoder | None,
                attached: dict[str, SparseAutoencoder] | None) -> SparseAutoencoder | None:
    """The SAE a feature's `sae` names (None or absent: the default); SAE_NOT_ATTACHED when it is not attached."""
    name = feature.get("sae")
    if name is None:
        return default
    if not isinstance(name, str):
        raise ValidationFailed(f"{field}.sae: must be an SAE name", details={"field": f"{field}.sae"})
    saes = attached if attached is not None else ({default.name: default} if default is not None else {})
    sae = saes.get(name)
    if sae is None:
        raise SaeNotAttached(f"{field}.sae: SAE {name!r} is not attached (attached: {', '.join(saes) or 'none'})",
                             details={"field": f"{field}.sae"})
    return sae


def strengths_to_raw_by_sae(*, sae: SparseAutoencoder, features: list[dict[str, Any]], units: str,
                            attached: dict[str, SparseAutoencoder] | None = None) -> list[dict[str, Any]]:
    """`strengths_to_raw` with each feature's own SAE (its labels' max activation, its residual norm), in order."""
    groups: dict[str, list[int]] = {}
    for position, feature in enumerate(features):
        groups.setdefault(feature.get("sae") or sae.name, []).append(position)
    if set(groups) <= {sae.name}:
        return strengths_to_raw(sae=sae, features=features, units=units)
    saes = {**(attached or {}), sae.name: sae}
    raw: list[dict[str, Any]] = list(features)
    for name, positions in groups.items():
        if name not in saes:
            raise SaeNotAttached(f"features[{positions[0]}].sae: SAE {name!r} is not attached "
                                 f"(attached: {', '.join(saes)})", details={"field": f"features[{positions[0]}].sae"})
        converted = strengths_to_raw(sae=saes[name], features=[features[p] for p in positions], units=units)
        for position, feature in zip(positions, converted, strict=True):
            raw[position] = feature
    return raw


def features_fill_recommended_by_sae(*, sae: SparseAutoencoder | None, features: list[dict[str, Any]], units: str,
                                     attached: dict[str, SparseAutoencoder] | None) -> list[dict[str, Any]]:
    """A feature without a strength gets the calibrated strength of ITS SAE (calibration.json per SAE), not the
    default SAE's; the order is kept. An SAE that is not attached is refused (SAE_NOT_ATTACHED)."""
    if all(f.get("strength") is not None for f in features):
        return features
    filled = list(features)
    for position, feature in enumerate(features):
        if feature.get("strength") is None:
            target = feature_sae(feature, field=f"features[{position}]", default=sae, attached=attached)
            filled[position] = features_fill_recommended(sae=target, features=[feature], units=units)[0]
    return filled
