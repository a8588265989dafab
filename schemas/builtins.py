"""Names and recipe versions of the models castbook builds itself (no download).

Lives in `schemas` (no torch) because job keys depend on it: a built-in's identity
is `builtin:NAME@rRECIPE`, and bumping a recipe invalidates every cached image made
with it. `renderer.models` and `reports.metrics` build the weights.
"""

BUILTIN_RECIPES: dict[str, int] = {
    "tiny-sdxl": 1,  # SDXL architecture, ~2 M params UNet, CPU-fast; tests and the demo
    "tiny-controlnet": 1,  # ControlNetModel.from_unet(tiny-sdxl UNet), perturbed output layers
    "sdxl-random": 1,  # full SDXL-base UNet config, random weights: GPU benchmarks without downloads
    "tiny-clip": 1,  # open_clip model from a tiny config: the default scorer
}

BASE_MODELS = ("tiny-sdxl", "sdxl-random")
CONTROLNET_MODELS = ("tiny-controlnet",)
CLIP_MODELS = ("tiny-clip",)


def builtin_digest(name: str) -> str:
    """The identity of a built-in in job keys: changes when its recipe changes."""
    return f"builtin:{name}@r{BUILTIN_RECIPES[name]}"
