"""synckit's trial suite."""
