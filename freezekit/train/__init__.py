"""The recipe runner: data, checkpoints, feature caching, progress, and the training loop
(:func:`freezekit.train.run.run`)."""
