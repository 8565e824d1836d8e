"""Dirigo: the edge gateway between a hospital's PACS and a statewide image exchange."""

__version__ = "0.1.0"
