"""Training methods behind one interface (``base.Method``) and a registry."""
