"""Thin KFP components, one per stage (see DESIGN.md)."""
