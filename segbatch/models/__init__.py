"""The model registry, weights (torchvision's, a checkpoint, or seeded for tests) and what each model needs."""
