"""Step 5 of the pipeline: verify the rewritten model and count its cost."""

from compscale.verify.function import output_error
from compscale.verify.latency import Latency, latency
from compscale.verify.plot import plot_costs
from compscale.verify.profile import Profile, profile

__all__ = ["Latency", "Profile", "latency", "output_error", "plot_costs", "profile"]
