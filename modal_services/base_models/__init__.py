"""Base models: the registry, their downloads and verification, optional models an admin enables, and service tokens."""
