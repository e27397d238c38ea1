"""Flows: one AAM delivery (aam) or one Campaign export file (export), end to end."""
