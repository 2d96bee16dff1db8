"""The web viewer behind `interleaf serve`: one page and an API streaming the sampler's events."""

from interleaf.serve.app import ServeLimits, Worker, create_app

__all__ = ["ServeLimits", "Worker", "create_app"]
