"""The scoring graph: stages as plain classes, wrapped as Ray Serve deployments in app.py."""
