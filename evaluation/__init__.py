"""Offline evaluation of the funnel's stages."""
