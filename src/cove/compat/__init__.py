"""Wire-compatible front ends: other platforms' protocols served on top of cove's service."""
