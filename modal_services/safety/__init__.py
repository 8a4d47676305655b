"""Content safety: prompt screening, the NSFW image classifier, and the decision the worker acts on."""
