"""The SSE gateway: live notifications in the browser, replay, and the inbox API."""
