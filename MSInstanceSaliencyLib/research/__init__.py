"""Research: phantoms, training, losses, validation, the papers' experiments and the reproduction report."""
