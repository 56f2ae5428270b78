"""headrace worker: the wire modules at this level (torch-free); engine/, models/, service/, cli/ below.

See the README's "Layout" for what each folder holds and the direction of imports.
"""
