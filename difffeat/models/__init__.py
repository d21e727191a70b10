"""The model side of extraction: backbones (one class per denoiser family), how module outputs become maps, and
layer presets. Nothing here knows techniques, stores or runs."""
