"""Placeholder until the capsule family lands (helper in progress)."""
