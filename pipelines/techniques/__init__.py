"""The built-in generation techniques, one module each (prompt, prompt:auto, lora, cfg, controlnet, denoise-from).

Every module here is imported when a spec is first parsed (`pipelines.base.load_techniques`, by `pkgutil`), and
registers its technique with `@register_technique`: a new technique is one new file in this folder.
"""
