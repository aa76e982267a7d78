"""Step 1 of the pipeline: torch.fx tracing with module paths and fake-tensor shapes."""

from compscale.trace.tracer import CompscaleTracer, Traced, module_path, trace

__all__ = ["CompscaleTracer", "Traced", "module_path", "trace"]
