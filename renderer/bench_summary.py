"""The `castbook bench` results as terminal lines (also what benchmarks/gpu_suite.sh logs)."""

from __future__ import annotations


def summary_lines(r: dict) -> list[str]:
    """The figures, one per line, for the terminal and the GPU suite's log."""

    def f(v, unit="s", digits=3):
        return "n/a" if v is None else f"{v:.{digits}f} {unit}".rstrip()

    def gib(v):
        return "n/a" if v is None else f"{v / 2**30:.2f} GiB"

    o, env = r["options"], r["environment"]
    lines = [
        f"castbook bench: {o['model']} {o['size']}x{o['size']} {o['steps']} steps, {o['images']} images, "
        f"{env['device']} {env['dtype']}{' ' + env['gpu'] if env.get('gpu') else ''}, "
        f"{'compiled' if o['compile'] else 'eager'}, loras={o['loras']}, controlnet={o['controlnet']}",
        f"  path                      castbook={r['castbook_path']} (in-process), torch {env.get('torch')}, diffusers {env.get('diffusers')}",
        f"  applied                   {', '.join(r['applied']) or '-'}",
        f"  model load                {f(r['model_load_s'])}",
        f"  warm-up (castbook, first) {f(r['warmup_s'])}   first compile: {f(r['first_compile_s'])}   graphs: {r['compiled_graphs']}",
        f"  castbook s/image p50/p95  {f(r['castbook']['s_per_image_p50'])} / {f(r['castbook']['s_per_image_p95'])}",
        f"  bare     s/image p50/p95  {f(r['bare']['s_per_image_p50'])} / {f(r['bare']['s_per_image_p95'])}",
        f"  overhead ratio (p50)      {f(r['overhead_ratio'], 'x', 4)}   (mean {f(r['overhead_ratio_mean'], 'x', 4)})",
        f"  identical images          {r['identical_images']}/{o['images']} (max pixel diff {r['max_pixel_diff']})",
        f"  peak memory               {gib(r['peak_memory_bytes'])} ({r['peak_memory_kind']})"
        + ("" if r["within_10gb"] is None else f"  ≤ 10 GB: {r['within_10gb']}"),
        f"  FLOPs/image               {r['flops']['per_image'] / 1e12:.4f} TFLOP (UNet fwd {r['flops']['unet_forward'] / 1e12:.4f}"
        f" x {r['flops']['steps']} steps, ControlNet fwd {r['flops']['controlnet_forward'] / 1e12:.4f}, "
        f"VAE decode {r['flops']['vae_decode'] / 1e12:.4f})",
        f"  achieved                  {f(r['achieved_tflops'], 'TFLOP/s', 4)} (bare {f(r['achieved_tflops_bare'], 'TFLOP/s', 4)})"
        f"   bf16 peak {f(r['device_bf16_peak_tflops'], 'TFLOP/s', 0)}   {f(r['percent_of_peak'], '% of peak', 1)}",
    ]
    for mode in ("load", "hotswap"):
        s = r["lora_switch"].get(mode)
        if s is None:
            lines.append(f"  LoRA switch ({mode:<7})     not measured")
        else:
            lines.append(f"  LoRA switch ({mode:<7})     set_adapters {f(s['set_adapters_s'], 's', 4)} "
                         f"(+{s['set_adapters_new_graphs']} graphs), new file {f(s['new_file_s'], 's', 4)} "
                         f"(+{s['new_file_new_graphs']} graphs, render {f(s['new_file_render_s'])})")
    b = r.get("batching")
    if b:
        lines.append(f"  batching (bare, {b['batch']})        {f(b['batched_s_per_image'])}/image batched vs "
                     f"{f(b['sequential_s_per_image'])} one by one: x{b['speedup']:.2f}; identical "
                     f"{b['identical_images']}/{b['batch']} (max diff {b['max_pixel_diff_vs_single']})")
    lines.append(f"  results                   {r['run_dir']}/bench.json")
    return lines
