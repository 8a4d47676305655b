"""What people, terminals and API clients call the text-to-image models: names only, so that the CLI's
help shows them without loading the request models (`bot.core.generate_models` has the models)."""

# The model a request that names none gets.
DEFAULT_MODEL = "sdxl"
# Every name a person, a terminal or an API client may call a model by, and the model's key.
MODEL_ALIASES = {"sdxl": "sdxl", "flux": "flux", "flux-dev": "flux", "flux1-dev": "flux"}
