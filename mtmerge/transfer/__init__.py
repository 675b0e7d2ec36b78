"""Task transfer beyond task vectors: adapters and ScaLearn."""
