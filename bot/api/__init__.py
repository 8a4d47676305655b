"""The HTTP API: the bot's jobs over HTTP (FastAPI), on the same backend seam, and its client.

- `POST /generate-image`: the SDXL worker contract, answered with the images
  (routes/images.py).
- `POST /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}`: any kind of job, for
  work longer than one HTTP request may last (routes/jobs.py).
- `GET /health`: models, services, versions; no token needed (routes/health.py).

`app.py` assembles them (`create_app`, `api_for_settings`); `dependencies.py`
holds auth and what the endpoints are given; `payloads.py` turns request
bodies into job requests; `responses.py` the error answers and result
encoding; `schema.py` the wire models; `client.py` the client
`toolbox generate --api` uses.
"""

from bot.api.app import api_for_settings, create_app
from bot.api.client import ApiClient

__all__ = ["ApiClient", "api_for_settings", "create_app"]
