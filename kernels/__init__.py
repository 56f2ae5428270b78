"""headrace kernels."""
