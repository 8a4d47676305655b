"""The API's endpoints, one module per group: health, images (the synchronous call), jobs."""
