"""The web front door: the landing page, /docs, /status and /demo, their templates and static files."""
