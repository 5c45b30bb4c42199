"""Helpers shared by every kernel family: launch configurations and dtype rules."""
