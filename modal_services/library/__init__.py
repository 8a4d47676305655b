"""The model library: entries, CivitAI imports and uploads, LoRA formats, and the migration from the Gradio toolbox layout."""
