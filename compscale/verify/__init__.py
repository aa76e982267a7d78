"""Step 5 of the pipeline: verify the rewritten model and count its cost."""

from compscale.verify.profile import Profile, profile

__all__ = ["Profile", "profile"]
