"""castbook's scheduler names: the diffusers class and config overrides behind each, and the
sampler name A1111 writes. Plain data (no torch): job keys hash a scheduler's whole recipe, and
the renderer builds it from the base model's own scheduler config plus these overrides.

Few-step schedulers for distilled LoRAs (LCM, TCD, SDXL-Lightning, Hyper-SD, DMD2):
`lcm` (LCM-LoRA), `tcd` (TCD-LoRA, Hyper-SD) and `euler_trailing` (Lightning and DMD2 use Euler
with trailing timestep spacing). Their LoRAs are usually run at guidance 1-2 and 2-8 steps: see the
built-in `fast` preset and a registry entry's `recommended` settings.
"""

from __future__ import annotations

from typing import Literal

from schemas.base import Strict

SchedulerName = Literal[
    "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "lcm", "tcd", "euler_trailing",
]


class SchedulerRecipe(Strict):
    cls: str  # diffusers class name, built with `from_config(base_model_config, **config)`
    config: dict[str, str | int | float | bool] = {}
    a1111: str  # "Sampler" in A1111's infotext
    a1111_schedule: str | None = None  # "Schedule type", when A1111 has a name for it


SCHEDULERS: dict[str, SchedulerRecipe] = {
    "euler": SchedulerRecipe(cls="EulerDiscreteScheduler", a1111="Euler"),
    "euler_a": SchedulerRecipe(cls="EulerAncestralDiscreteScheduler", a1111="Euler a"),
    "dpmpp_2m": SchedulerRecipe(cls="DPMSolverMultistepScheduler", a1111="DPM++ 2M",
                                config={"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": SchedulerRecipe(
        # A1111 1.10 writes the schedule as its own field: "Sampler: DPM++ 2M, Schedule type: Karras".
        cls="DPMSolverMultistepScheduler", a1111="DPM++ 2M", a1111_schedule="Karras",
        config={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": SchedulerRecipe(cls="DDIMScheduler", a1111="DDIM"),
    "unipc": SchedulerRecipe(cls="UniPCMultistepScheduler", a1111="UniPC"),
    "lcm": SchedulerRecipe(cls="LCMScheduler", a1111="LCM"),
    "tcd": SchedulerRecipe(cls="TCDScheduler", a1111="TCD"),
    # SDXL-Lightning's and DMD2's own recommendation; A1111/Forge call it "SGM Uniform".
    "euler_trailing": SchedulerRecipe(cls="EulerDiscreteScheduler", a1111="Euler", a1111_schedule="SGM Uniform",
                                      config={"timestep_spacing": "trailing"}),
}


def scheduler_key(name: str) -> dict:
    """What a job key hashes for a scheduler: its class and every override, not just the name."""
    recipe = SCHEDULERS[name]
    return {"name": name, "class": recipe.cls, "config": dict(sorted(recipe.config.items()))}
