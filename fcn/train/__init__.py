"""The train stage: data and augmentation, the epoch loop, multi-process plumbing, the run."""
