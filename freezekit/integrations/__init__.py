"""freezekit inside other people's training loops: PyTorch Lightning (:mod:`.lightning`) and the
Hugging Face ``Trainer`` (:mod:`.transformers`). Each imports its framework only when imported
itself; ``import freezekit`` never does. What they share, in loop-neutral terms, is
:class:`~freezekit.integrations.loop.LoopDriver`."""
