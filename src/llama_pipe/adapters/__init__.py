"""What happens to a trained adapter: ``select`` (which evaluation checkpoint to keep) and
``merge_adapter`` (adapters merged into a float copy of the base)."""
