"""Model modules (flax.linen, logical axis names); the tasks build them from config.model."""
