"""Step 5 of the pipeline: verify the rewritten model and count its cost."""

from compscale.verify.function import output_error
from compscale.verify.profile import Profile, profile

__all__ = ["Profile", "output_error", "profile"]
