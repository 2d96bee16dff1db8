"""The web viewer behind `interleaf serve`: one page and an API streaming the sampler's events.

app.py     routes, the page, the model's description, the Host check
forms.py   reading and bounding a request: fields, uploads, SamplingParams, the prompt
worker.py  the thread that owns the model, its queue, the events as server-sent events
"""

from interleaf.serve.app import create_app
from interleaf.serve.forms import ServeLimits
from interleaf.serve.worker import Worker

__all__ = ["ServeLimits", "Worker", "create_app"]
