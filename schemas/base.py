"""The one strict base class of every castbook model: spec, job, training, toy recipe, records."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Frozen, and an unknown field is an error (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
