"""headrace ops."""
