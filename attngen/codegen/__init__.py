"""Rendering plans through the Jinja templates (shipped in templates/) and writing modules."""
