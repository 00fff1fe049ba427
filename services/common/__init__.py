"""Contracts shared by every process: errors, block hashing, wire structs. No torch import here."""
