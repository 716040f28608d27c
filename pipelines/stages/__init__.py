"""The pipeline's stages, prepare -> train -> evaluate -> compare: plain functions wired by pipelines.run."""
