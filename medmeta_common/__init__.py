"""Code both sides share: configs, data, episodes, models, privacy, the wire format."""
