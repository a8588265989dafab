"""Performance settings applied to a loaded pipeline: QKV fusion, channels_last, VAE tiling and
slicing, model CPU offload (`apply_performance`) and `torch.compile` (`compile_pipeline`).

Every option that can change pixels is stored in the PNG's `castbook` chunk (the job's
`performance`), so `castbook reproduce` applies the same ones.
"""

from __future__ import annotations

# torch.compile mode used when the spec asks for `compile: true` without a mode. Autotuned
# kernels without CUDA graphs: CUDA graphs ("reduce-overhead", "max-autotune") pin input
# buffers and re-record per shape/LoRA stack, which costs memory and breaks hotswapping.
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"


def apply_performance(pipe, performance: dict, device: str) -> list[str]:
    """Apply the spec's `performance:` options that are set at load time; returns their names.

    Order matters: the VAE swap and QKV fusion change modules, channels_last changes
    memory layout; `torch.compile` is NOT applied here but by `compile_pipeline`, after
    the first job's LoRAs are loaded (see `JobRenderer`), so the first graph already
    contains the LoRA layers and loading them does not force a recompile.
    SDPA (`F.scaled_dot_product_attention`) is diffusers' default attention: nothing to set.
    """
    import torch

    applied = ["sdpa"]
    if performance.get("fuse_qkv"):
        # Changes float summation order (pixels may differ in the last bit); off by default.
        pipe.fuse_qkv_projections(unet=True, vae=True)
        applied.append("fuse_qkv")
    if performance.get("channels_last"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if performance.get("vae_tiling"):
        pipe.vae.enable_tiling()
        applied.append("vae_tiling")
    if performance.get("vae_slicing"):
        pipe.vae.enable_slicing()
        applied.append("vae_slicing")
    # Model CPU offload moves modules to the GPU one at a time; meaningless without CUDA.
    if performance.get("cpu_offload") and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
        applied.append("cpu_offload")
    return applied


def compile_module(module, mode: str | None = None, backend: str = "inductor") -> None:
    """`torch.compile` a module in place (`nn.Module.compile`): it stays the same diffusers
    class, so peft/diffusers LoRA loading and hotswap keep working on it.

    `mode`: a torch.compile mode (default `DEFAULT_COMPILE_MODE`). `backend="eager"` only
    traces (cheap; tests use it to count recompiles without building kernels).
    Compilation itself happens lazily at the first call: run a warm-up job first.
    """
    kw = {"mode": mode or DEFAULT_COMPILE_MODE} if backend == "inductor" else {"backend": backend}
    module.compile(fullgraph=False, **kw)


def compile_pipeline(pipe, mode: str | None = None, backend: str = "inductor") -> list[str]:
    """Compile the UNet and the VAE decoder of `pipe`; returns the names for logs."""
    compile_module(pipe.unet, mode, backend)
    compile_module(pipe.vae.decoder, mode, backend)
    return ["compile_unet", "compile_vae_decode"]
