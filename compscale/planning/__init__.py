"""Step 3 of the pipeline: the scaling plan (multipliers, repeats per stage, width per group, input size)."""
