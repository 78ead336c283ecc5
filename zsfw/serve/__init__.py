"""Serving a compressed model: compiled generation and AOTInductor export."""
