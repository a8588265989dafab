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
    # Trained by castbook on the procedural toy world; weights ship in renderer/weights/toy/.
    # Bump when they are retrained.
    "toy-sdxl": 2,
    "toy-controlnet": 2,  # ControlNet trained on toy-sdxl with drawn pose maps (retrain it with the base)
    "toy-clip": 2,  # default scorer wherever the base model is builtin:toy-sdxl
    "tiny-ip-adapter": 1,  # plain IP-Adapter for tiny-sdxl, random projection, with a tiny random image encoder
    "toy-ip-adapter": 2,  # IP-Adapter + small image encoder trained on toy-sdxl (specs/toy/toy-ip-adapter.yaml); 2: distilled
}

# What each shipped (trained) built-in's recipe number stands for: `core.digests.folder_digest`
# of its folder in renderer/weights/toy/. A test fails when the committed weights change without
# a new recipe number above, which would let images cached from the old weights pass as new.
SHIPPED_WEIGHTS: dict[str, str] = {
    "toy-sdxl": "86c4309a572a87633f33293a9d3d2fd93ccc966ae599a9a180575037d63f6645",
    "toy-controlnet": "4d921fbf29ca6e75d422a743ac1b3498373911a8eda531f753d075fd3f5b8670",
    "toy-clip": "9ccc00390c3efaaa9d929c6e35df387d0d8d124f728008f4a2d3f34a61b666ad",
    "toy-ip-adapter": "e8206004d2599ec8a4ef087c3136f0ce469a9e9b055c2668d73b12003a56dfaf",
}

BASE_MODELS = ("tiny-sdxl", "sdxl-random", "toy-sdxl")
CONTROLNET_MODELS = ("tiny-controlnet", "toy-controlnet")
CLIP_MODELS = ("tiny-clip", "toy-clip")
IP_ADAPTER_MODELS = ("tiny-ip-adapter", "toy-ip-adapter")

# The ControlNet and scorer a built-in base model uses unless the spec names others.
DEFAULT_CONTROLNET = {"tiny-sdxl": "tiny-controlnet", "toy-sdxl": "toy-controlnet"}
DEFAULT_SCORER = {"toy-sdxl": "toy-clip"}


def builtin_digest(name: str) -> str:
    """The identity of a built-in in job keys: changes when its recipe changes."""
    return f"builtin:{name}@r{BUILTIN_RECIPES[name]}"
