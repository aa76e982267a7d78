"""Step 1 of the pipeline: torch.fx tracing with module paths and fake-tensor shapes."""

from compscale.trace.entry import trace
from compscale.trace.tracer import CompscaleTracer, Traced, module_path

__all__ = ["CompscaleTracer", "Traced", "module_path", "trace"]
