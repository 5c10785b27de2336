"""The gateway: an OpenAI-compatible HTTP API with SSE streaming, health, metrics and the chat page."""
