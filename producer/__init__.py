"""headrace producer."""
