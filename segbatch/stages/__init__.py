"""The run's stages, in the order rows flow: listing (or a manifest), decode, model, postprocess, sinks and writers."""
