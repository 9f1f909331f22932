"""A profile made from steering set up in the pages (the Steering panel or the active steering)."""

from __future__ import annotations

import re
from typing import Any

from millm_site.errors import SaeNotAttached, ValidationFailed
from profiles.models import Profile
from profiles.services import profile_save
from steering.sae_addressing import attached_saes_in_order, strengths_to_raw_by_sae
from steering.steering_options import steering_options_resolve
from steering.steering_services import attached_sae, steering_validate

PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")  # a slug: it travels in the OpenAI model field as <model>:<name>


def profile_name_check(name: str) -> str:
    name = name.strip()
    if not PROFILE_NAME.fullmatch(name):
        raise ValidationFailed("name: 1–100 letters, digits, '-' or '_'", details={"field": "name"})
    return name


def profile_save_from_steering(*, name: str, description: str = "", features: list[dict[str, Any]],
                               mode: str = "additive", positions: str = "all", units: str = "raw",
                               preset: str | None = None, replace: bool = False, max_steered_tokens: int | None = None,
                               until_concept: bool = False) -> Profile:
    """Save the given steering of the attached SAE as a profile.

    Profiles hold raw strengths (what the engine applies), so relative units are converted here, once,
    with the SAE's recorded norms; the description records the strengths as they were typed.
    """
    name = profile_name_check(name)
    sae = attached_sae()
    if sae is None:
        raise SaeNotAttached("No SAE is attached: attach one on the SAEs page, then steer its features")
    options = steering_options_resolve(sae=sae, mode=mode, positions=positions, units=units, preset=preset,
                                       max_steered_tokens=max_steered_tokens, until_concept=until_concept)
    mode, positions, units = options.mode, options.positions, options.units
    attached = attached_saes_in_order()  # a feature may name any attached SAE (`sae`)
    normalised = steering_validate(sae=sae, features=features, mode=mode, positions=positions, units=units,
                                   attached=attached)
    if not normalised:
        raise ValidationFailed("features: add at least one feature to save", details={"field": "features"})
    raw = strengths_to_raw_by_sae(sae=sae, features=normalised, units=units, attached=attached)
    labels = {(own.name, index): label for own in {sae, *(attached[f["sae"]] for f in raw if f.get("sae"))}
              for index, label in own.labels.filter(index__in=[f["index"] for f in raw]).values_list("index", "label")}
    if units != "raw":
        typed = ", ".join(f"#{f['index']} {f['strength']:g}" for f in normalised)
        description = (description + "\n" if description else "") + f"Set as {typed} ({units})."
    return profile_save(name=name, description=description.strip(), model=sae.model, sae=sae, mode=mode,
                        positions=positions, layers=options.layers, direction=options.direction, replace=replace,
                        max_steered_tokens=options.max_steered_tokens, until_concept=options.until_concept,
                        features=[{**f, "label": labels.get((f.get("sae") or sae.name, f["index"]), "")[:300]}
                                  for f in raw])
