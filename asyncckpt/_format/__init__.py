"""Format: torch.save serialization, encryption, the index document, names, retention."""
