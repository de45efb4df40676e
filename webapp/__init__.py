"""The merge lab web app: Gradio UI (UI process) and the worker process that owns the device."""
