"""The recoverability dashboard: pure builders (summary), SVG charts (charts), the FastAPI app (api), the plugin."""
