"""Step 4 of the pipeline: the passes that rewrite a copy of the model to the plan (depth, width, resolution), and
the fresh or grown weights of what they add; then the library metadata that describes the result."""
