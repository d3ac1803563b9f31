"""The three stages; each is a small class the training loop drives."""
