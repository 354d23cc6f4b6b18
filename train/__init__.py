"""Training loops: the dense detector, ManiDP/FBS gate training, static pruning."""
