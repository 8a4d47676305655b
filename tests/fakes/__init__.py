"""Fakes of the outside world (Modal, Hugging Face, CivitAI) for offline tests."""
