"""The built-in many-to-many text-image world: scenes, captions, exact oracle and a
learned CLIP-like reward model. Importing it registers `world_clip` and `world_oracle`."""

from bpgo_jax.world import rewards  # noqa: F401  (registers the rewards)
