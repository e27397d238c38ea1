"""Batch audience exchange between Adobe Audience Manager and Adobe Campaign."""

__version__ = "0.1.0"
