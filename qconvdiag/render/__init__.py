"""Renderers: turn a Report (or a case) into text; the core never prints."""
