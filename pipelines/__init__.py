"""Generation techniques as plugins (prompts, ControlNet, LoRA, denoise-from, CFG): one file per technique.

Filled by the techniques issue; the package exists so the distribution's layout is fixed from the start.
"""
