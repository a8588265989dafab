"""castbook's own toy world: the procedural generator, its pixel checker, and the recipes that
train the toy-world built-ins (`builtin:toy-sdxl`, `builtin:toy-controlnet`, `builtin:toy-clip`).

Only the CLI and the tests import this package; the product packages never do.
"""
