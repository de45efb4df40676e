"""The UI process: the Gradio page, its panels, and the client of the worker."""
